"""One conversion of decoded images to 8-bit RGB, shared by every place that decodes images (training shards,
latent encoding, aspect-ratio buckets, the image-folder source).

- 16-bit grayscale (Pillow modes ``I;16``, ``I;16B``, ``I;16L``, and ``I`` as older Pillows load 16-bit PNGs):
  0..65535 onto 0..255 as round(v / 257). Pillow's own ``convert("RGB")`` clips at 255, which turns them
  white.
- 48-bit RGB, 64-bit RGBA and 32-bit gray+alpha PNGs: Pillow loads them as 8-bit RGB / RGBA / LA keeping the
  high byte, floor(v / 256), within 1 of round(v / 257); they are used as loaded.
- Transparency (RGBA, LA, PA, premultiplied RGBa / La, and P, L, RGB or 16-bit gray with a transparent colour
  or palette index): composited over ``background`` (white by default, ``data.alpha_background`` in training,
  ``--alpha-background`` for ``prepare.py latents`` / ``export-autoencoder``) as
  round((c * a + bg * (255 - a)) / 255). Dropping the alpha instead shows the colour stored under transparent
  pixels, often black.
- Every other mode (L, 1, P, CMYK, YCbCr, ...): Pillow's ``convert("RGB")``. 32-bit float images (``F``) have
  no known range and raise ValueError, which the decoders count as ``decode_error``.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from PIL import Image

__all__ = ["WHITE", "open_rgb", "parse_background", "to_rgb"]

WHITE = (255, 255, 255)
Background = tuple[int, int, int]
_NAMED = {"white": WHITE, "black": (0, 0, 0)}
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def parse_background(spec: str | Sequence[int]) -> Background:
    """``white`` | ``black`` | ``#rrggbb`` | ``r,g,b`` | [r, g, b] -> (r, g, b) in 0..255."""
    values: list[int] | None = None
    if isinstance(spec, str):
        text = spec.strip().lower()
        if text in _NAMED:
            return _NAMED[text]
        try:
            if text.startswith("#") and len(text) == 7:
                values = [int(text[i : i + 2], 16) for i in (1, 3, 5)]
            elif text.count(",") == 2:
                values = [int(v) for v in text.split(",")]
        except ValueError:
            values = None
    else:
        try:
            values = [int(v) for v in spec]
        except (TypeError, ValueError):
            values = None
    if values is None or len(values) != 3 or not all(0 <= v <= 255 for v in values):
        raise ValueError(
            f"alpha_background must be white, black, #rrggbb or r,g,b (0..255 each), got {spec!r}: e.g. "
            "data.alpha_background=white or --alpha-background '#808080'"
        )
    return values[0], values[1], values[2]


def _composite(rgba: np.ndarray, background: Background) -> np.ndarray:
    """(H, W, 4) uint8 -> (H, W, 3) uint8 over an opaque background: round((c a + bg (255 - a)) / 255)."""
    alpha = rgba[..., 3:].astype(np.uint32)  # (H, W, 1)
    bg = np.asarray(background, np.uint32)  # (3,)
    return ((rgba[..., :3] * alpha + bg * (255 - alpha) + 127) // 255).astype(np.uint8)


def _sixteen_bit(im: Image.Image, background: Background) -> Image.Image:
    values = np.asarray(im).astype(np.int64)  # (H, W), 0..65535
    gray = ((2 * np.clip(values, 0, 65535) + 257) // 514).astype(np.uint8)  # round(v / 257)
    rgba = np.repeat(gray[..., None], 4, axis=2)  # (H, W, 4)
    key = im.info.get("transparency")
    rgba[..., 3] = np.where(values == key, 0, 255) if isinstance(key, int) else 255
    return Image.fromarray(_composite(rgba, background))


def to_rgb(im: Image.Image, background: Background = WHITE) -> Image.Image:
    """A new 8-bit RGB image from ``im`` of any Pillow mode (see the module notes)."""
    if im.mode in _SIXTEEN_BIT:
        return _sixteen_bit(im, background)
    if im.mode == "F":
        raise ValueError("32-bit float images (mode F) have no known range: convert them to 8 or 16 bits")
    if im.mode in _ALPHA_MODES or "transparency" in im.info:
        return Image.fromarray(_composite(np.asarray(im.convert("RGBA")), background))
    return im.convert("RGB")


def open_rgb(data: bytes, background: Background = WHITE) -> Image.Image:
    """Image file bytes -> 8-bit RGB (``to_rgb``); raises what Pillow raises on bytes it cannot decode."""
    with Image.open(io.BytesIO(data)) as im:
        return to_rgb(im, background)
