"""Raw shard samples -> checked training samples; every rejected sample is counted under one reason.

Reasons: ``missing_caption`` (none, or blank), ``caption_too_long``, ``caption_not_utf8`` (skipped, not
guessed: another encoding read as Latin-1 or cp1252 would silently train on wrong text; re-encode the
captions, e.g. with ``iconv``), ``decode_error`` (an image or ``.npy`` that does not decode),
``duplicate_member`` (a member name twice in one sample), ``bad_label``, ``missing_image``,
``missing_latent``, ``latent_shape``, ``latent_dtype``, ``latent_nonfinite`` (NaN/inf), ``bad_embedding``,
``bad_size`` (a ``KEY.size.json`` of aspect-ratio buckets that is not {"original_size": [h, w],
"crop_top_left": [y, x], ...}). Each count also names the shard.
"""

from __future__ import annotations

import ast
import json
import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from ldm.data.buckets import as_latent_shapes, latent_shape_set
from ldm.data.rgb import WHITE, Background, open_rgb, parse_background
from ldm.data.shards import SkipCounter

log = logging.getLogger(__name__)

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")
KINDS = ("images", "latents")
FLOATS = (np.dtype(np.float16), np.dtype(np.float32))
_NPY_MAGIC = b"\x93NUMPY"
_npy_headers: dict[bytes, tuple[np.dtype, tuple[int, ...], bool]] = {}
NO_LATENT_SHAPE = (
    "latent shards need their latent shape and neither the shard index meta nor the config gives it: set "
    "data.latent_shape=[4,32,32] (ShardDataset(latent_shape=...)), or a list of shapes for aspect-ratio "
    "buckets"
)
# what decoding one image (or caption) can raise: PIL's OSError/ValueError/SyntaxError, UnicodeDecodeError (a
# ValueError), and DecompressionBombError, which is a plain Exception; catch this tuple to skip the sample
DECODE_ERRORS: tuple[type[Exception], ...] = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def decode_image(data: bytes, size: int, background: Background = WHITE) -> torch.Tensor:
    """Image bytes -> (3, size, size) float in [-1, 1]: 8-bit RGB over ``background`` (``ldm.data.rgb``), the
    short side resized to ``size``, centre crop."""
    with open_rgb(data, background) as im:
        scale = size / min(im.size)
        w, h = max(size, round(im.width * scale)), max(size, round(im.height * scale))
        if (w, h) != im.size:
            im = im.resize((w, h), Image.Resampling.BICUBIC, reducing_gap=3.0)
        left, top = (w - size) // 2, (h - size) // 2
        im = im.crop((left, top, left + size, top + size))
        array = np.asarray(im, dtype=np.uint8)  # (H, W, 3)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 127.5 - 1.0  # (3, H, W)


def load_npy(data: bytes) -> np.ndarray:
    """``.npy`` bytes -> a read-only array over ``data`` (no copy); ValueError when not a plain ``.npy``.

    The header (format 1.0-3.0) is parsed once per distinct header: a shard's latents all share one.
    """
    if data[:6] != _NPY_MAGIC or len(data) < 10:
        raise ValueError("not a .npy file")
    start = 10 if data[6] == 1 else 12
    length = int.from_bytes(data[8:start], "little")
    header = data[start : start + length]
    parsed = _npy_headers.get(header)
    if parsed is None:
        fields = ast.literal_eval(header.decode("latin1"))
        dtype = np.lib.format.descr_to_dtype(fields["descr"])
        if dtype.hasobject:
            raise ValueError("object arrays are not loaded")
        parsed = (dtype, tuple(int(n) for n in fields["shape"]), bool(fields["fortran_order"]))
        if len(_npy_headers) < 256:
            _npy_headers[header] = parsed
    dtype, shape, fortran = parsed
    count = int(np.prod(shape))
    array = np.frombuffer(data, dtype=dtype, count=count, offset=start + length)
    return array.reshape(shape, order="F" if fortran else "C")


def all_finite(array: np.ndarray) -> bool:
    """No NaN or inf. For float16 the exponent bits are tested directly (4x faster than ``np.isfinite``)."""
    if array.dtype == np.float16:
        return not ((array.view(np.uint16) & 0x7C00) == 0x7C00).any()  # exponent all ones: inf or NaN
    return bool(np.isfinite(array).all())


def decode_latent(data: bytes) -> torch.Tensor | None:
    """``.npy`` bytes -> (C, h, w) float32; None if not a finite 3-d float array."""
    array = load_npy(data)
    if array.ndim != 3 or array.dtype not in FLOATS or not all_finite(array):
        return None
    return torch.from_numpy(array.astype(np.float32))


def decode_embedding(data: bytes) -> torch.Tensor | None:
    """``.npy`` bytes -> (L, D) float32 token embeddings; None if not a finite non-empty 2-d float array."""
    array = _embedding(data)
    return None if array is None else torch.from_numpy(array.astype(np.float32))


def _embedding(data: bytes) -> np.ndarray | None:
    try:
        array = load_npy(data)
    except (ValueError, SyntaxError, KeyError, TypeError):
        return None
    if array.ndim != 2 or array.shape[0] == 0 or array.dtype not in FLOATS or not all_finite(array):
        return None
    return array


Skip = Callable[..., None]  # skip(reason, why="") counts a bad sample and returns None


def check_members(raw: dict[str, Any], skip: Skip) -> bool:
    """False once ``skip`` has counted a sample whose tar holds one member name twice
    (``duplicate_member``)."""
    if "__duplicate__" in raw:
        skip("duplicate_member", f"{raw['__duplicate__']} twice")
        return False
    return True


def check_caption(raw: dict[str, Any], skip: Skip, max_chars: int | None = None) -> str | None:
    """The sample's UTF-8 caption, or None once ``skip`` has counted why it is unusable."""
    if "txt" not in raw:
        return skip("missing_caption")
    try:
        text = raw["txt"].decode("utf-8")
    except UnicodeDecodeError:
        return skip("caption_not_utf8", "re-encode the captions as UTF-8")
    if not text.strip():
        return skip("missing_caption", "blank caption")
    if max_chars is not None and len(text) > max_chars:
        return skip("caption_too_long", f"{len(text)} > max_caption_chars={max_chars}")
    return text


def check_image(raw: dict[str, Any], skip: Skip, decode: Callable[[bytes], Any]) -> Any | None:
    """``decode`` applied to the sample's image bytes, or None once ``skip`` has counted why it failed."""
    ext = next((e for e in IMAGE_EXTS if e in raw), None)
    if ext is None:
        return skip("missing_image")
    try:
        return decode(raw[ext])
    except DECODE_ERRORS as exn:
        return skip("decode_error", f"{type(exn).__name__}: {exn}")


class SampleDecoder:
    """Decodes and checks one raw sample ({"__key__", "__url__", ext: bytes}); None (and a count) if bad.

    Latents and embeddings stay numpy arrays in their stored dtype; the collate converts whole batches.
    ``latent_shape`` (C, h, w) is required for latents (ShardDataset reads it from the shard index meta); a
    list of shapes (one per aspect-ratio bucket) accepts any of them. Bucketed samples also get
    "original_size" and "crop_top_left" ([h, w], [y, x]) from ``KEY.size.json``. ``latent_dtype`` None:
    float16 and float32 are both accepted. ``alpha_background``: the colour behind transparent pixels of
    images (``ldm.data.rgb.parse_background``: white, black, #rrggbb, r,g,b).
    """

    def __init__(
        self,
        kind: str,
        image_size: int = 32,
        latent_shape: tuple[int, ...] | tuple[tuple[int, ...], ...] | None = None,
        latent_dtype: str | None = None,
        max_caption_chars: int | None = 1000,
        alpha_background: str | Sequence[int] = "white",
    ) -> None:
        latent_shape, shapes = as_latent_shapes(latent_shape), latent_shape_set(latent_shape)
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got '{kind}'")
        if shapes is not None and any(len(shape) != 3 for shape in shapes):
            raise ValueError(
                f"latent_shape must be (C, h, w) or a list of them, got {latent_shape}: e.g. "
                f"latent_shape=[4,32,32]"
            )
        if kind == "latents" and shapes is None:
            raise ValueError(NO_LATENT_SHAPE)
        dtype = None if latent_dtype is None else np.dtype(latent_dtype)
        if dtype is not None and dtype not in FLOATS:
            raise ValueError(
                f"latent_dtype must be float16 or float32 (or null for either), got '{latent_dtype}'"
            )
        self.kind = kind
        self.image_size = image_size
        self.latent_shape = latent_shape  # (C, h, w), a tuple of them, or None (images)
        self.latent_shapes = shapes
        self.latent_dtype = dtype
        self.max_caption_chars = max_caption_chars
        self.background = parse_background(alpha_background)

    def __call__(self, raw: dict[str, Any], counter: SkipCounter) -> dict[str, Any] | None:
        key, shard = raw["__key__"], raw.get("__url__")

        def skip(reason: str, why: str = "") -> None:
            counter.add(reason, detail=f"(key {key} in {shard}{': ' + why if why else ''}) ", shard=shard)

        text = check_caption(raw, skip, self.max_caption_chars) if check_members(raw, skip) else None
        if text is None:
            return None
        sample: dict[str, Any] = {"__key__": key, "txt": text}
        if "cls" in raw:
            try:
                sample["cls"] = int(raw["cls"].decode("utf-8").strip())
            except (UnicodeDecodeError, ValueError):
                return skip("bad_label")
        if self.kind == "images":
            image = check_image(raw, skip, lambda data: decode_image(data, self.image_size, self.background))
            return None if image is None else {**sample, "image": image}
        return self._latent_sample(raw, sample, skip)

    def _latent_sample(self, raw: dict[str, Any], sample: dict[str, Any], skip: Any) -> dict[str, Any] | None:
        if "latent.npy" not in raw:
            return skip("missing_latent")
        try:
            latent = load_npy(raw["latent.npy"])
        except (ValueError, SyntaxError, KeyError, TypeError) as exn:
            return skip("decode_error", f"latent .npy: {exn}")
        if latent.shape not in (self.latent_shapes or ()):
            return skip("latent_shape", f"{latent.shape} not in latent_shape {self.latent_shape}")
        if latent.dtype != self.latent_dtype if self.latent_dtype is not None else latent.dtype not in FLOATS:
            return skip("latent_dtype", f"{latent.dtype} != latent_dtype {self.latent_dtype or 'float16|32'}")
        if not all_finite(latent):
            return skip("latent_nonfinite", "NaN or inf")
        sample["latent"] = latent  # (C, h, w)
        if (
            "emb.npy" in raw
        ):  # precomputed frozen text-encoder output for the caption: (L_i, D), real tokens only
            emb = _embedding(raw["emb.npy"])
            if emb is None:
                return skip("bad_embedding", "need a finite float (L, D) array")
            sample["emb"] = emb
        if "size.json" in raw:  # aspect-ratio buckets: what the encoder's resize and crop did
            sizes = _size_conditioning(raw["size.json"])
            if sizes is None:
                return skip("bad_size", 'need {"original_size": [h, w], "crop_top_left": [y, x]}')
            sample.update(sizes)
        return sample


def _size_conditioning(data: bytes) -> dict[str, list[int]] | None:
    """``KEY.size.json`` -> {"original_size": [h, w], "crop_top_left": [y, x]}; None when malformed."""
    try:
        fields = json.loads(data)
        out = {k: [int(v) for v in fields[k]] for k in ("original_size", "crop_top_left")}
    except (ValueError, KeyError, TypeError):
        return None
    return out if all(len(v) == 2 for v in out.values()) else None
