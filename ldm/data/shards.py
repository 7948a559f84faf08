"""Writing WebDataset shards (plain tar files) and their JSON index, plus the skip counter.

A shard is a tar of ``KEY.ext`` members; ``{prefix}.json`` next to the shards records which shards exist,
how many samples each holds, and free-form ``meta`` (e.g. which autoencoder made latent shards).
"""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds

log = logging.getLogger(__name__)


class SkipCounter:
    """Counts skipped samples per reason (and per shard when given); warns the first time each reason appears.

    ``reads`` counts the samples looked at (good and bad: ``count_read``), so that bad / reads is a fraction
    over one set of reads; ``pop_reads`` hands them on with each batch as ``pop`` does the skips.
    """

    def __init__(self, name: str = "data") -> None:
        self.name = name
        self.reads = 0
        self.counts: dict[str, int] = {}
        self.by_shard: dict[str, dict[str, int]] = {}
        self._warned: set[str] = set()

    def add(self, reason: str, n: int = 1, detail: str = "", shard: str | None = None) -> None:
        if n <= 0:
            return
        self.counts[reason] = self.counts.get(reason, 0) + n
        if shard is not None:
            reasons = self.by_shard.setdefault(shard, {})
            reasons[reason] = reasons.get(reason, 0) + n
        if reason not in self._warned:
            self._warned.add(reason)
            log.warning(
                "%s: skipping sample(s), reason=%s %s(further ones are counted)", self.name, reason, detail
            )

    def count_read(self, n: int = 1) -> None:
        """``n`` more samples read (each counted once, bad or not)."""
        self.reads += n

    def pop_reads(self) -> int:
        """Returns the samples read so far and resets the count."""
        reads, self.reads = self.reads, 0
        return reads

    def merge(self, other: SkipCounter | dict[str, int]) -> None:
        counts = other.as_dict() if isinstance(other, SkipCounter) else other
        for reason, n in counts.items():
            self.add(reason, n)

    def as_dict(self) -> dict[str, int]:
        return dict(self.counts)

    def pop(self) -> dict[str, int]:
        """Returns the counts so far and resets them (the warn-once memory is kept)."""
        counts, self.counts = self.counts, {}
        return counts

    def pop_shards(self) -> dict[str, dict[str, int]]:
        """Returns the per-shard counts so far ({shard: {reason: n}}) and resets them."""
        by_shard, self.by_shard = self.by_shard, {}
        return by_shard

    def total(self) -> int:
        return sum(self.counts.values())

    def __repr__(self) -> str:
        return f"SkipCounter({self.name!r}, {self.counts})"


def _encode(key: str, value: Any) -> tuple[str, bytes]:
    """Maps one sample field to (tar extension, bytes). Numpy arrays become ``.npy``."""
    if isinstance(value, np.ndarray):
        buf = io.BytesIO()
        np.save(buf, value, allow_pickle=False)
        return (key if key.endswith(".npy") else f"{key}.npy"), buf.getvalue()
    if isinstance(value, bytes | bytearray):
        return key, bytes(value)
    if isinstance(value, str):
        return key, value.encode("utf-8")
    if isinstance(value, bool | int | np.integer):
        return key, str(int(value)).encode("utf-8")
    if isinstance(value, dict | list):
        return key, json.dumps(value).encode("utf-8")
    raise TypeError(
        f"Cannot store field '{key}' of type {type(value).__name__}: pass bytes, str, int, dict or ndarray"
    )


def _encode_sample(sample: dict[str, Any]) -> dict[str, Any]:
    if "__key__" not in sample:
        raise ValueError("Every sample needs a '__key__' (a unique id such as '00042')")
    key = str(sample["__key__"])
    if "." in key or "/" in key:
        raise ValueError(f"Sample key '{key}' must not contain '.' or '/': use e.g. '00042' or 'a_00042'")
    out: dict[str, Any] = {"__key__": key}
    for name, value in sample.items():
        if name.startswith("__"):
            continue
        ext, data = _encode(name, value)
        out[ext] = data
    return out


class _ShardSink:
    """Writes one shard to ``name.tmp`` and renames it on close, so a crash never leaves a half shard."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.tmp = path.with_name(path.name + ".tmp")
        self.stream = open(self.tmp, "wb")  # noqa: SIM115 - closed in close()
        self.writer = wds.TarWriter(self.stream, encoder=False, mtime=0.0)
        self.count = 0

    def write(self, sample: dict[str, Any]) -> None:
        self.writer.write(sample)
        self.count += 1

    def close(self) -> None:
        with self.stream:  # TarWriter does not close a file object it was given
            self.writer.close()
        os.replace(self.tmp, self.path)

    def discard(self) -> None:
        """Closes the writer and the file (also when the writer fails to close) and removes ``name.tmp``."""
        try:
            if not self.stream.closed:
                with self.stream:
                    self.writer.close()
        finally:
            self.tmp.unlink(missing_ok=True)


class ShardSeries:
    """``{prefix}-000000.tar, ...`` written one sample at a time (each shard through ``.tmp``), then its
    index."""

    def __init__(self, out_dir: str | os.PathLike, prefix: str = "train", max_per_shard: int = 1000) -> None:
        if max_per_shard < 1:
            raise ValueError(f"max_per_shard must be >= 1, got {max_per_shard}")
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self.max_per_shard = max_per_shard
        self.paths: list[str] = []
        self.counts: list[int] = []
        self.sink: _ShardSink | None = None

    def write(self, sample: dict[str, Any]) -> None:
        if self.sink is None:
            self.sink = _ShardSink(self.out / f"{self.prefix}-{len(self.paths):06d}.tar")
        self.sink.write(_encode_sample(sample))
        if self.sink.count >= self.max_per_shard:
            self._close_shard()

    def _close_shard(self) -> None:
        if self.sink is not None:
            self.sink.close()
            self.paths.append(str(self.sink.path))
            self.counts.append(self.sink.count)
            self.sink = None

    def finish(self, meta: dict | None = None) -> list[str]:
        """Closes the last shard and writes the index ``{prefix}.json``; returns the shard paths."""
        self._close_shard()
        index = {
            "shards": [Path(p).name for p in self.paths],
            "counts": self.counts,
            "total": sum(self.counts),
            "meta": meta or {},
        }
        index_path = self.out / f"{self.prefix}.json"
        tmp = index_path.with_name(index_path.name + ".tmp")
        tmp.write_text(json.dumps(index, indent=1))
        os.replace(tmp, index_path)
        log.info("wrote %d samples in %d shards to %s", index["total"], len(self.paths), self.out)
        return self.paths

    def discard(self) -> None:
        """Removes the unfinished shard (finished ones stay, as after a crash)."""
        if self.sink is not None:
            self.sink.discard()
            self.sink = None


def write_shards(
    samples: Iterable[dict],
    out_dir: str,
    prefix: str = "train",
    max_per_shard: int = 1000,
    meta: dict | None = None,
) -> list[str]:
    """Writes ``{prefix}-000000.tar, ...`` and the index ``{prefix}.json``; returns the shard paths."""
    series = ShardSeries(out_dir, prefix, max_per_shard)
    try:
        for sample in samples:
            series.write(sample)
    except BaseException:
        series.discard()
        raise
    return series.finish(meta)


def write_split_shards(
    samples: Iterable[dict],
    out_dir: str,
    split: Callable[[str], str],
    prefixes: Sequence[str] = ("train", "val"),
    max_per_shard: int = 1000,
    meta: Callable[[str], dict] | None = None,
) -> dict[str, int]:
    """Streams each sample into the shard series ``split(key)`` names (one of ``prefixes``); every prefix gets
    its index (``meta(prefix)`` once all samples are written), also when empty. Returns the samples per
    prefix."""
    series = {p: ShardSeries(out_dir, p, max_per_shard) for p in prefixes}
    try:
        for sample in samples:
            prefix = split(str(sample["__key__"]))
            if prefix not in series:
                raise ValueError(
                    f"split gave '{prefix}' for key {sample['__key__']}: return one of {list(prefixes)}"
                )
            series[prefix].write(sample)
    except BaseException:
        for s in series.values():
            s.discard()
        raise
    for p, s in series.items():
        s.finish(meta(p) if meta is not None else None)
    return {p: sum(s.counts) for p, s in series.items()}


def read_index(json_path: str) -> dict:
    """Loads ``{prefix}.json``; adds ``paths`` (shard paths resolved next to the index)."""
    path = Path(json_path)
    if not path.is_file():
        raise FileNotFoundError(
            f"No shard index at '{json_path}': write shards with ldm.data.write_shards first"
        )
    index = json.loads(path.read_text())
    missing = {"shards", "counts", "total"} - set(index)
    if missing:
        raise ValueError(f"Shard index '{json_path}' lacks {sorted(missing)}: rewrite it with write_shards")
    if len(index["shards"]) != len(index["counts"]):
        raise ValueError(
            f"Shard index '{json_path}' has {len(index['shards'])} shards but {len(index['counts'])} counts"
        )
    index.setdefault("meta", {})
    index["paths"] = [str(path.parent / name) for name in index["shards"]]
    return index


# ------------------------------------------------------------------------------------------ resumable writing
def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Writes JSON through a temporary file unique to this process, then renames it: readers (and other
    processes writing the same file) never see a half-written file."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def write_shard(samples: Iterable[dict], path: str | os.PathLike) -> int:
    """Writes one shard at ``path`` (via ``path.tmp``, renamed when complete); returns its sample count.

    Unlike ``write_shards`` the caller names the shard, so a restarted job can rewrite exactly the shards it
    lacks.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sink = _ShardSink(path)
    try:
        for sample in samples:
            sink.write(_encode_sample(sample))
    except BaseException:
        sink.discard()
        raise
    sink.close()
    return sink.count


def write_index(
    out_dir: str | os.PathLike, prefix: str, shards: list[str], counts: list[int], meta: dict
) -> Path:
    """Writes ``{prefix}.json`` (the format ``write_shards`` writes and ``read_index`` reads) atomically."""
    if len(shards) != len(counts):
        raise ValueError(f"{len(shards)} shards but {len(counts)} counts: pass one count per shard")
    index = {"shards": list(shards), "counts": list(counts), "total": sum(counts), "meta": meta}
    path = Path(out_dir) / f"{prefix}.json"
    write_json_atomic(path, index)
    return path
