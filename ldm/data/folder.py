"""A folder of images with same-named ``.txt`` captions (``cat.png`` + ``cat.txt``), searched recursively."""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Iterator
from pathlib import Path

from PIL import Image

from ldm.data.decode import DECODE_ERRORS
from ldm.data.shards import SkipCounter

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def _key(path: Path, root: Path) -> str:
    """A shard-safe key from the relative path: ``a/b.c/cat.png`` -> ``a_b_c_cat``."""
    return _UNSAFE.sub("_", str(path.relative_to(root).with_suffix("")))


def _decodes(data: bytes) -> bool:
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
        return True
    except DECODE_ERRORS:
        return False


def image_files(root: Path) -> list[Path]:
    """The images under ``root`` (recursively, sorted) that ``folder_samples`` reads, each with ``.txt`` beside it."""
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def folder_samples(root: str, counter: SkipCounter) -> Iterator[dict]:
    """Yields {"__key__", "<ext>": image bytes, "txt": caption}; skips (and counts) bad pairs.

    Reasons: "missing_caption" (no same-named .txt), "decode_error" (the image does not decode).
    """
    base = Path(root)
    if not base.is_dir():
        raise FileNotFoundError(
            f"Image folder '{root}' does not exist: pass a directory of images + .txt captions"
        )
    paths = image_files(base)
    if not paths:
        log.warning("no images (%s) under %s", ", ".join(IMAGE_SUFFIXES), root)
    seen: set[str] = set()
    for path in paths:
        caption_path = path.with_suffix(".txt")
        if not caption_path.is_file():
            counter.add("missing_caption", detail=f"({path} has no {caption_path.name}) ")
            continue
        data = path.read_bytes()
        if not _decodes(data):
            counter.add("decode_error", detail=f"({path}) ")
            continue
        key = _key(path, base)
        if key in seen:
            counter.add("duplicate_key", detail=f"({path} maps to key {key} again) ")
            continue
        seen.add(key)
        ext = path.suffix.lower().lstrip(".")
        yield {"__key__": key, "jpg" if ext == "jpeg" else ext: data, "txt": caption_path.read_text().strip()}
