"""A folder of images with same-named ``.txt`` captions (``cat.png`` + ``cat.txt``), searched recursively.

Keys come from the relative paths (``a/b/cat.png`` -> ``a_b_cat``), so they are stable and unique (two paths
that map to one key are skipped and counted); ``hash_split`` holds out a seeded, stable fraction of them.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Callable, Iterator
from pathlib import Path

from ldm.data.decode import check_caption, check_image
from ldm.data.rgb import open_rgb
from ldm.data.shards import SkipCounter

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def _key(path: Path, root: Path) -> str:
    """A shard-safe key from the relative path: ``a/b.c/cat.png`` -> ``a_b_c_cat``."""
    return _UNSAFE.sub("_", str(path.relative_to(root).with_suffix("")))


def image_files(root: Path) -> list[Path]:
    """The images under ``root`` (recursively, sorted) that ``folder_samples`` reads, each with ``.txt``
    beside it."""
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def folder_samples(root: str, counter: SkipCounter) -> Iterator[dict]:
    """Yields {"__key__", "<ext>": image bytes, "txt": caption}; skips (and counts) bad pairs.

    The image bytes are stored as they are (the colour conversion, ``ldm.data.rgb``, happens where shards are
    decoded); here each image is decoded and converted once to check it, and each caption with training's
    check (``ldm.data.decode.check_caption``). Reasons: "missing_caption" (no same-named .txt, or a blank
    one), "caption_not_utf8" (skipped, not guessed: re-encode the captions as UTF-8), "decode_error" (the
    image does not decode), "duplicate_key" (two paths map to one key).
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

        def skip(reason: str, why: str = "", path: Path = path) -> None:
            counter.add(reason, detail=f"({path}{': ' + why if why else ''}) ")

        caption_path = path.with_suffix(".txt")
        if not caption_path.is_file():
            skip("missing_caption", f"no {caption_path.name}")
            continue
        ext = path.suffix.lower().lstrip(".")
        raw = {ext: path.read_bytes(), "txt": caption_path.read_bytes()}
        text = check_caption(raw, skip)
        if text is None or check_image(raw, skip, open_rgb) is None:
            continue
        key = _key(path, base)
        if key in seen:
            skip("duplicate_key", f"maps to key {key} again")
            continue
        seen.add(key)
        yield {"__key__": key, "jpg" if ext == "jpeg" else ext: raw[ext], "txt": text.strip()}


def hash_split(val_fraction: float, seed: int = 0) -> Callable[[str], bool]:
    """``is_validation(key)``: a key is held out when a seeded hash of it falls below ``val_fraction``.

    Each key's side depends on the key and the seed only, so adding or removing other images moves no sample
    between train and validation.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction}: pass a fraction in [0, 1) (e.g. --val-fraction 0.05)")

    def is_validation(key: str) -> bool:
        digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
        return int.from_bytes(digest[:8], "big") < val_fraction * 2**64

    return is_validation
