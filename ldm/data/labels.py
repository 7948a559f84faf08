"""Class labels in shards: the field ``cls`` per sample and the class names in the shard index.

A labelled shard set stores each sample's class id as ``KEY.cls`` (decimal text); ``ShardDataset`` batches
carry it as ``batch["cls"]``, an int64 ``(B,)`` tensor. The index ``{prefix}.json`` names the classes in its
meta: ``"labels"`` (id i is ``labels[i]``), ``"label_level"`` (what the names are, e.g. "category") and, for
image shards, ``"label_counts"`` (samples per class, in id order). ``prepare.py latents`` copies the names and
the level from the image index into the latent index. ``read_label_names`` reads the names back, e.g. to keep
them in a model.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ldm.data.shards import read_index
from ldm.data.urls import DEFAULT_COMMANDS, expand_urls, load_index

__all__ = ["LABEL_FIELD", "carried_label_meta", "label_meta", "read_label_names"]

LABEL_FIELD = "cls"  # the sample field (KEY.cls) and the batch key
CARRIED = ("labels", "label_level")  # what latent shards take over from their image shards' index


def label_meta(names: Sequence[str], level: str, ids: Iterable[int] | None = None) -> dict[str, Any]:
    """The index meta of a labelled shard set: names, level, and (given the ids written) samples per class."""
    names = list(names)
    if len(set(names)) != len(names) or not all(isinstance(n, str) and n for n in names):
        raise ValueError(
            f"class names must be distinct non-empty strings, got {names[:5]}...: fix the vocabulary"
        )
    meta: dict[str, Any] = {"labels": names, "label_level": level}
    if ids is not None:
        counts = Counter(ids)
        meta["label_counts"] = [counts.get(i, 0) for i in range(len(names))]
    return meta


def read_label_names(source: str | os.PathLike | Mapping[str, Any], prefix: str = "train") -> list[str]:
    """The class names of a labelled shard set (id i is name i).

    ``source``: an index meta dict, a whole index dict (``{"shards", "counts", "meta"}``), an index file
    ``{prefix}.json``, a shard directory (its ``{prefix}.json`` is read) or a shard path or pattern (the index
    beside its first shard).
    """
    meta = _meta(source, prefix)
    names = meta.get("labels")
    if not isinstance(names, list) or not names:
        raise ValueError(
            f"no class names ('labels') in the shard index meta of {_describe(source)}: write labelled "
            f"shards "
            "with `prepare.py emoji --labels category|subcategory`"
        )
    return [str(n) for n in names]


def carried_label_meta(image_urls: Sequence[str]) -> dict[str, Any]:
    """``labels`` and ``label_level`` from the index beside the image shards, for the latent index ({} if
    none)."""
    found: dict[str, Any] | None = None
    for index_meta in _image_index_metas(image_urls):
        carried = {k: index_meta[k] for k in CARRIED if k in index_meta}
        if found is not None and carried != found:
            raise ValueError(
                "the image shards come from indexes with different class names: encode each labelled set on "
                "its own"
            )
        found = carried
    return found or {}


def _image_index_metas(image_urls: Sequence[str]) -> list[dict[str, Any]]:
    metas, seen = [], set()
    for url in image_urls:
        directory = str(Path(url).parent)
        if directory in seen:
            continue
        seen.add(directory)
        try:
            metas.append(load_index(url, DEFAULT_COMMANDS).get("meta", {}))
        except (FileNotFoundError, ValueError):
            metas.append({})  # an unindexed shard carries no class names
    return metas


def _meta(source: str | os.PathLike | Mapping[str, Any], prefix: str) -> Mapping[str, Any]:
    if isinstance(source, Mapping):
        return source.get("meta", {}) if "shards" in source else source
    path = Path(source)
    if path.is_dir():
        return read_index(str(path / f"{prefix}.json"))["meta"]
    if path.suffix == ".json":
        return read_index(str(path))["meta"]
    return load_index(expand_urls(str(source))[0], DEFAULT_COMMANDS).get("meta", {})


def _describe(source: str | os.PathLike | Mapping[str, Any]) -> str:
    return "the given meta" if isinstance(source, Mapping) else f"'{source}'"
