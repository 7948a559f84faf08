"""Refusing writes that would land on user input, checked before anything is written.

Paths are compared resolved (symlinks, ``..``, relative spellings of one path are one path) and, where both
exist, as files (a hard link is another name of the same file). ``prepare.py`` and ``ldm.encode`` call these
before writing shards, indexes, sidecars or exported weights.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path

from ldm.data.shards import SkipCounter
from ldm.data.tar_reader import raw_samples
from ldm.data.urls import index_url_for, is_remote, local_path

__all__ = [
    "check_latent_outputs",
    "input_files",
    "refuse_foreign_outputs",
    "refuse_outputs_among",
    "refuse_overwrite",
]


def input_files(urls: Iterable[str]) -> list[Path]:
    """The local shard files among ``urls`` and the shard index beside each (``{prefix}.json``)."""
    found: dict[str, Path] = {}
    for url in urls:
        if is_remote(url):
            continue
        found.setdefault(local_path(url), Path(local_path(url)))
        index = index_url_for(url)
        if index is not None:
            found.setdefault(index, Path(index))
    return list(found.values())


def _file_id(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino


def refuse_overwrite(outputs: Iterable[Path], inputs: Iterable[Path], fix: str) -> None:
    """ValueError naming the first output that is an input (resolved path, or the same file), and ``fix``."""
    inputs = list(inputs)
    by_path = {p.resolve(): p for p in inputs}
    by_file = {fid: p for p in inputs if (fid := _file_id(p)) is not None}
    for out in outputs:
        hit = by_path.get(out.resolve())
        if hit is None:  # another name of the same file: a hard link
            fid = _file_id(out)
            hit = by_file.get(fid) if fid is not None else None
        if hit is not None:
            raise ValueError(f"writing {out} would overwrite the input {hit}: {fix}")


def refuse_outputs_among(inputs: Iterable[Path], out_dir: Path, names: re.Pattern[str], fix: str) -> None:
    """ValueError when an input resolves into ``out_dir`` under a name the command writes (``names``), e.g. an
    input symlink that points where an output shard goes: writing the output would replace what it reads."""
    out = out_dir.resolve()
    for path in inputs:
        target = path.resolve()
        if target.parent == out and names.fullmatch(target.name):
            raise ValueError(f"writing {target} would overwrite the input {path}: {fix}")


def _is_latent_index(path: Path) -> bool:
    try:
        index = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(index, dict) and "autoencoder" in (index.get("meta") or {})


def _first_sample(path: Path) -> dict | None:
    samples = raw_samples([str(path)], SkipCounter(f"check {path.name}"))
    try:
        return next(samples, None)
    finally:
        samples.close()


def refuse_foreign_outputs(shards: Iterable[Path], index: Path | None, fix: str) -> None:
    """ValueError when an existing file where a latent shard (or the latent index) goes is something else: a
    shard whose first sample holds no ``latent.npy`` (an image shard), or an index whose meta names no
    autoencoder. Only the shards without a finished sidecar need checking (the caller's choice)."""
    for path in shards:
        if path.is_file() and "latent.npy" not in (_first_sample(path) or {}):
            raise ValueError(
                f"{path} exists and is not a latent shard (no .latent.npy in its first sample): {fix}"
            )
    if index is not None and index.is_file() and not _is_latent_index(index):
        raise ValueError(
            f"{index} exists and is not a latent shard index (no autoencoder in its meta): {fix}"
        )


def tmp_of(path: Path) -> Path:
    """``path.tmp``: where shards and weights are written before the rename (``ldm.data.shards``)."""
    return path.with_name(path.name + ".tmp")


LATENT_FIX = (
    "choose another --out (or --prefix) for the latents: the image shards and their index are the input"
)


def check_latent_outputs(
    out: Path, prefix: str, names: list[str], urls: list[str], unfinished: list[str], sidecar: str
) -> None:
    """Before encoding ``urls`` into ``out``: no latent shard (``names``), its ``.tmp`` or sidecar, nor the
    index ``{prefix}.json`` may be an input shard or index, and the ``unfinished`` shards (no sidecar of this
    command) and the index must not be files of another kind. ``--overwrite`` does not lift this."""
    shards = [out / name for name in names]
    outputs = [out / f"{prefix}.json", *shards, *map(tmp_of, shards), *(out / f"{n}{sidecar}" for n in names)]
    refuse_overwrite(outputs, input_files(urls), LATENT_FIX)
    refuse_foreign_outputs(
        [out / name for name in unfinished],
        out / f"{prefix}.json",
        "choose another --out (or --prefix) for the latents, or move that file away",
    )
