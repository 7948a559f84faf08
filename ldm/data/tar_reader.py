"""Streaming tar reader for WebDataset shards: members grouped into raw samples, damage counted, never fatal.

Reads POSIX ustar, pax (``x`` headers set the next member's path and size) and GNU long names, the formats
Python's ``tarfile``, GNU tar and the WebDataset writers produce; every other member type is skipped. It is a
few times faster than ``tarfile``'s stream mode and tells a truncated shard (no end-of-archive block, a short
header or member) from a complete one: the samples before the cut are kept, a sample the cut may have left
incomplete is dropped, and the shard counts once under ``truncated_shard``. A header that fails its checksum
counts under ``corrupt_shard`` and reading goes on from the next valid header; ``read_error``: the file cannot
be opened or the command fails. Each of these shard-level losses also counts as one sample read (the samples a
damaged shard held cannot be counted), so the skips never outnumber the reads. A sample holding one member
name twice keeps the first and is marked ``__duplicate__`` (the decoder drops it, counted as
``duplicate_member``).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator
from typing import Any

from ldm.data.shards import SkipCounter
from ldm.data.urls import DEFAULT_COMMANDS, ShardStream

log = logging.getLogger(__name__)

BLOCK = 512
_ZERO_BLOCK = bytes(BLOCK)
_REGULAR = (b"0", b"\0", b"7")


class ShardDamaged(Exception):
    """The tar stream ended early (``truncated``) or holds an invalid header (``corrupt``); ``member`` names
    the member whose data was cut, when the damage is inside one."""

    def __init__(self, reason: str, message: str, member: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.member = member


def _octal(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256 for sizes of 8 GiB and more
        return int.from_bytes(field[1:], "big")
    field = field.split(b"\0", 1)[0].strip()
    return int(field, 8) if field else 0


def _read_exact(stream: ShardStream, n: int, offset: int, member: str | None) -> bytes:
    data = stream.read(n)
    if len(data) != n:
        raise ShardDamaged(
            "truncated", f"ends at byte {offset + len(data)} inside {member or 'a header'}", member
        )
    return data


def _member_name(header: bytes, pending: str | None) -> str:
    if pending is not None:
        return pending
    name = header[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
    if header[257:262] == b"ustar" and header[345] != 0:
        name = header[345:500].split(b"\0", 1)[0].decode("utf-8", "replace") + "/" + name
    return name


def _pax_records(data: bytes) -> dict[str, str]:
    """``"%d key=value\\n"`` records (POSIX.1-2001 extended headers); unparsable records end the list."""
    records, pos = {}, 0
    while pos < len(data):
        space = data.find(b" ", pos)
        if space < 0 or not data[pos:space].isdigit() or int(data[pos:space]) <= space - pos:
            break
        length = int(data[pos:space])
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        records[key.decode("utf-8", "replace")] = value.decode("utf-8", "replace")
        pos += length
    return records


def _valid_size(header: bytes, next_size: int | None) -> int | None:
    """The member size, or None when the header fails its checksum (a flipped bit, or not a header at all)."""
    try:
        stored, unsigned = _octal(header[148:156]), sum(header) - sum(header[148:156]) + 8 * 32
        if stored != unsigned and stored != unsigned - 256 * sum(b >= 128 for b in header):  # old signed sums
            return None
        return _octal(header[124:136]) if next_size is None else next_size
    except ValueError:
        return None


def tar_members(
    stream: ShardStream, on_corrupt: Callable[[str], None] | None = None
) -> Iterator[tuple[str, bytes]]:
    """(name, data) of each regular file; raises ShardDamaged when the archive is cut off.

    An invalid header is reported to ``on_corrupt`` (raised as ShardDamaged when None) and skipped: the reader
    moves block by block to the next valid header, so one damaged member does not cost the rest of the shard.
    """
    offset, resyncing = 0, False
    next_path: str | None = None
    next_size: int | None = None
    while True:
        header = stream.read(BLOCK)
        if len(header) < BLOCK:
            if resyncing and not header:
                return  # the damage ran to the end of the file; it is already reported
            where = "before the end-of-archive block" if not header else "inside a header"
            raise ShardDamaged("truncated", f"ends at byte {offset + len(header)} {where}")
        offset += BLOCK
        if header == _ZERO_BLOCK:
            if resyncing:  # zero-filled data of the damaged member, or the end-of-archive padding
                continue
            return  # end of archive (the second zero block is not needed)
        size = _valid_size(header, next_size)
        if size is None:
            if not resyncing:
                message = f"has an invalid header at byte {offset - BLOCK}"
                if on_corrupt is None:
                    raise ShardDamaged("corrupt", message)
                on_corrupt(message)
            resyncing, next_path, next_size = True, None, None
            continue
        resyncing = False
        kind = header[156:157]
        name = _member_name(header, next_path) if kind in _REGULAR else None
        padded = (size + BLOCK - 1) // BLOCK * BLOCK
        data = _read_exact(stream, padded, offset, name)[:size]
        offset += padded
        if kind in (b"x", b"L"):  # settings for the next member only
            if kind == b"L":
                next_path = data.split(b"\0", 1)[0].decode("utf-8", "replace")
                continue
            records = _pax_records(data)
            next_path = records.get("path", next_path)
            next_size = int(records["size"]) if records.get("size", "").isdigit() else next_size
            continue
        next_path = next_size = None
        if name is not None:
            yield name, data


def split_name(name: str) -> tuple[str, str] | None:
    """``dir/00042.latent.npy`` -> (``dir/00042``, ``latent.npy``): the key ends at the basename's first
    dot."""
    slash = name.rfind("/") + 1
    dot = name.find(".", slash)
    if dot <= slash:
        return None
    return name[:dot], name[dot + 1 :].lower()


def _damage(counter: SkipCounter, reason: str, url: str, detail: str) -> None:
    """One shard-level loss: counted as one sample read and skipped."""
    counter.count_read()
    counter.add(reason, detail=f"({url}{detail}) ", shard=url)


def _count_corrupt(counter: SkipCounter, url: str, message: str) -> None:
    _damage(counter, "corrupt_shard", url, f" {message}; reading on from the next valid header")


def shard_samples(url: str, counter: SkipCounter, commands: dict[str, str]) -> Iterator[dict[str, Any]]:
    """Raw samples ({"__key__", "__url__", ext: bytes}) of one shard, in order; damage is counted, not
    raised."""
    try:
        stream = ShardStream(url, commands)
    except OSError as exn:
        _damage(counter, "read_error", url, f": {exn}")
        return
    sample: dict[str, Any] | None = None
    damage: ShardDamaged | None = None
    finished = False
    try:
        try:
            corrupt = functools.partial(_count_corrupt, counter, url)
            for name, data in tar_members(stream, corrupt):
                parts = split_name(name)
                base = name.rsplit("/", 1)[-1]
                if parts is None or (base.startswith("__") and base.endswith("__")):
                    continue
                key, ext = parts
                if sample is not None and key != sample["__key__"]:
                    yield sample
                    sample = None
                if sample is None:
                    sample = {"__key__": key, "__url__": url}
                if ext in sample:  # which copy is meant is unknown: the decoder drops the sample
                    sample.setdefault("__duplicate__", name)
                    continue
                sample[ext] = data
        except ShardDamaged as exn:
            damage = exn
            cut = split_name(exn.member) if exn.member else None
            if sample is not None and (cut is None or cut[0] == sample["__key__"]):
                sample = (
                    None  # cut short (or cannot tell): dropped; complete when the cut member starts a new key
                )
        except OSError as exn:
            damage, sample = ShardDamaged("truncated", f"could not be read ({exn})"), None
        if sample is not None:
            yield sample
        finished = True
    finally:
        if not finished:  # the consumer stopped early, or an error is on its way out
            stream.abort()
    failure = stream.finish()
    if failure is not None:
        _damage(counter, "read_error", url, f": {failure}")
    elif damage is not None:
        _damage(counter, f"{damage.reason}_shard", url, f" {damage}")


def raw_samples(
    urls: list[str], counter: SkipCounter, commands: dict[str, str] | None = None
) -> Iterator[dict[str, Any]]:
    """Undecoded samples of the shards in order; unreadable and damaged shards are counted in ``counter``."""
    commands = commands if commands is not None else DEFAULT_COMMANDS
    for url in urls:
        yield from shard_samples(url, counter, commands)
