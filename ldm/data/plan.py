"""The data plan: which pieces of which shards each (rank, worker) reads in an epoch, and how many batches it
yields.

A piece is ``(url, stride, offset)``: the samples ``i`` of a shard (in tar order, every raw sample counted,
bad or not) with ``i % stride == offset``; a whole shard is ``(url, 1, 0)``. A "consumer" is one DataLoader
worker of one rank. Three modes (``data.mode``):

``exact``      every sample at most once per epoch over all ranks and workers. The shards, shuffled by
               (seed, epoch), are dealt whole to ranks, largest first, each to the rank holding fewest
               samples; the ``S mod world_size`` smallest left over are split by sample stride over all ranks
               (each rank reads them and keeps its share: a shard count divisible by the world size avoids the
               extra reads). Each rank deals its pieces to its workers the same way, splitting only when it
               has fewer pieces than workers. A worker can fill floor(its samples / batch size) batches; every
               rank yields the same number, the fewest any rank can fill (at most ``num_batches``); the rest
               of the epoch is dropped. Sizes come from the shard index, and the batch count does not depend
               on the shuffle.
``resampled``  an endless stream per worker: whole shards drawn with replacement from all shards by a
               generator seeded with (seed, epoch, rank, worker); ``num_batches`` per rank and epoch.
``cycle``      the shards split once by rank then worker (by sample stride when there are fewer shards than
               consumers); each worker reads its own shards again and again, in a new order per pass, for
               ``num_batches`` per rank. Samples of a small split repeat within an epoch; the split never
               changes, so each node only ever needs its own shards (node-local copies).

The DataLoader takes batches from its workers in turn, skipping a worker once it has given its quota, so batch
``i`` of a rank comes from a known worker: ``worker_share(i, quotas)`` is how many of the first ``i`` batches
each worker gave, which is what a resumed run skips, and ``resume_rotation`` renumbers the resumed loader's
workers so that its round robin goes on from the right one.
"""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

MODES = ("exact", "resampled", "cycle")
Piece = tuple[str, int, int]  # (url, stride, offset)


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"data.mode must be one of {MODES}, got '{mode}'")
    return mode


def piece_size(piece: Piece, counts: Mapping[str, int]) -> int:
    """Samples of ``piece``: the indices i < count with i % stride == offset."""
    url, stride, offset = piece
    return max(0, (counts[url] - offset + stride - 1) // stride)


def split_piece(piece: Piece, parts: int) -> list[Piece]:
    """``parts`` disjoint pieces that together hold ``piece``'s samples (stride s, offset o -> s*parts, o +
    s*j)."""
    url, stride, offset = piece
    return [(url, stride * parts, offset + stride * j) for j in range(parts)]


def deal(
    pieces: Sequence[Piece], counts: Mapping[str, int], parts: int, split_rest: bool
) -> list[list[Piece]]:
    """Pieces to ``parts`` lists balanced by samples: largest first (ties keep the given order), each to the
    part holding fewest (lowest index on ties). ``split_rest``: the ``len % parts`` smallest are split over
    all parts."""
    ordered = sorted(pieces, key=lambda p: -piece_size(p, counts))  # stable
    rest = len(ordered) % parts if split_rest else 0
    out: list[list[Piece]] = [[] for _ in range(parts)]
    heap = [(0, j) for j in range(parts)]
    for piece in ordered[: len(ordered) - rest]:
        load, j = heapq.heappop(heap)
        out[j].append(piece)
        heapq.heappush(heap, (load + piece_size(piece, counts), j))
    for piece in ordered[len(ordered) - rest :]:
        for j, sub in enumerate(split_piece(piece, parts)):
            out[j].append(sub)
    return out


def worker_share(total: int, caps: Sequence[int]) -> list[int]:
    """``total`` handed out one at a time to each worker in turn, skipping those at their cap.

    With caps = capacities this is the quota per worker; with caps = quotas and total = batches already taken
    it is how many of them each worker gave (the DataLoader's round-robin order).
    """
    if total > sum(caps):
        raise ValueError(f"cannot hand out {total} batches to workers that hold {list(caps)}")
    lo, hi = 0, max(caps, default=0)  # the most full rounds: sum(min(cap, rounds)) <= total
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if sum(min(c, mid) for c in caps) <= total else (lo, mid - 1)
    share = [min(c, lo) for c in caps]
    extra = total - sum(share)
    for w, cap in enumerate(caps):
        if extra and cap > lo:
            share[w] += 1
            extra -= 1
    return share


def resume_rotation(taken: int, quotas: Sequence[int]) -> int:
    """The worker that gives batch ``taken`` (0 once all are given): a resumed loader's worker j plays worker
    (j + this) % W, so that its round robin, which starts at worker 0, goes on where the interrupted one
    stopped."""
    if taken >= sum(quotas):
        return 0
    before, after = worker_share(taken, quotas), worker_share(taken + 1, quotas)
    return next(w for w, (a, b) in enumerate(zip(before, after, strict=True)) if a != b)


@dataclass(frozen=True)
class Plan:
    """One epoch: pieces[rank][worker] (None: drawn on the fly, resampled), quotas[rank][worker] in
    batches."""

    pieces: list[list[list[Piece]]] | None
    quotas: list[list[int]]
    batches: int  # per rank
    split_shards: int = 0  # shards every rank reads a share of (exact)

    def samples_used(self, batch_size: int) -> int:
        return self.batches * batch_size * len(self.quotas)


def make_plan(
    mode: str,
    urls: Sequence[str],
    counts: Sequence[int] | None,
    world_size: int,
    num_workers: int,
    batch_size: int,
    num_batches: int,
    order_seed: int | None,
) -> Plan:
    """The epoch's plan; ``order_seed`` shuffles the shards (exact), None keeps their order.

    ``counts``: samples per shard (from the shard index); None assumes each holds an equal share of
    ``num_batches * world_size * batch_size``.
    """
    workers = max(1, num_workers)
    if counts is None:
        each = math.ceil(num_batches * world_size * batch_size / len(urls))
        counts = [each] * len(urls)
    sizes = dict(zip(urls, counts, strict=True))
    if mode == "resampled":
        quotas = [worker_share(num_batches, [num_batches] * workers)] * world_size
        return Plan(None, quotas, num_batches)
    if mode == "cycle":
        consumers = world_size * workers
        if len(urls) >= consumers:
            pieces = [
                [[(u, 1, 0) for u in urls[r::world_size][w::workers]] for w in range(workers)]
                for r in range(world_size)
            ]
        else:
            pieces = [
                [[(u, consumers, r * workers + w) for u in urls] for w in range(workers)]
                for r in range(world_size)
            ]
        quotas = [worker_share(num_batches, [num_batches] * workers)] * world_size
        return Plan(pieces, quotas, num_batches)
    check_mode(mode)
    order = list(urls)
    if order_seed is not None:
        random.Random(order_seed).shuffle(order)
    by_rank = deal([(u, 1, 0) for u in order], sizes, world_size, split_rest=True)
    pieces = [deal(mine, sizes, workers, split_rest=len(mine) < workers) for mine in by_rank]
    caps = [[sum(piece_size(p, sizes) for p in ps) // batch_size for ps in rank] for rank in pieces]
    batches = min(num_batches, *(sum(c) for c in caps))
    quotas = [worker_share(batches, c) for c in caps]
    return Plan(pieces, quotas, batches, split_shards=len(urls) % world_size)
