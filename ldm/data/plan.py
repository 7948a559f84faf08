"""The data plan: which pieces of which shards each (rank, worker) reads in an epoch, and how many batches it
yields.

A piece is ``(url, stride, offset)``: the samples ``i`` of a shard (in tar order, every raw sample counted,
bad or not) with ``i % stride == offset``; a whole shard is ``(url, 1, 0)``. A "consumer" is one DataLoader
worker of one rank. Three modes (``data.mode``):

``exact``      every sample at most once per epoch over all ranks and workers. The shards, shuffled by
               (seed, epoch), then sorted largest first (stably), are dealt to ranks: the ``whole`` largest
               whole, each to the rank holding fewest samples; the rest split by sample stride over all ranks,
               as one stream dealt sample by sample in turn (the ranks' shares within one sample). Each rank
               reads a split shard in full and keeps its share, so ``whole`` is the count that gives the most
               batches per rank, the most whole among counts giving as many. Each rank splits its pieces over
               its workers the same way, with its own count: the most whole that still fills the rank's
               batches, and never all whole when it has fewer pieces than workers (some would idle). A worker
               can fill floor(its samples / batch size) batches; every rank yields the same number, the fewest
               any rank can fill (at most ``num_batches``); the rest of the epoch is dropped. Sizes come from
               the shard index. The layout (which sizes are whole, which split, where) is a function of the
               sorted sizes alone, so the batch count and quotas do not depend on the shuffle, which only
               decides which of equal-size shards goes where. E.g. 7 x 500 + 246 samples, batch 64, 4 ranks:
               all whole gives ranks 1000, 1000, 1000, 746 samples, 11 batches each (25% dropped); the 4
               largest whole and 4 split give each ~936, 14 batches (4% dropped).
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
from functools import lru_cache

MODES = ("exact", "resampled", "cycle")
Piece = tuple[str, int, int]  # (url, stride, offset)
Share = tuple[int, int, int]  # (shard position, stride, offset)


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"data.mode must be one of {MODES}, got '{mode}'")
    return mode


def piece_size(piece: Piece, counts: Mapping[str, int]) -> int:
    """Samples of ``piece``: the indices i < count with i % stride == offset."""
    url, stride, offset = piece
    return share_size(counts[url], stride, offset)


def share_size(size: int, stride: int, offset: int) -> int:
    """Samples ``i < size`` with ``i % stride == offset``."""
    return max(0, (size - offset + stride - 1) // stride)


def deal(sizes: Sequence[int], parts: int, whole: int) -> list[list[Share]]:
    """Pieces of ``sizes`` (largest first) to ``parts`` lists of shares ``(index, stride, offset)``: the
    first ``whole`` whole, each to the part holding fewest samples (lowest index on ties); the rest split as
    one stream dealt sample by sample in turn (part ``p`` takes the stream positions ``p mod parts``), so
    that the split shares of the parts differ by at most one sample. Empty shares are left out, but for
    offset 0 (the reader that counts a shard's damage)."""
    out: list[list[Share]] = [[] for _ in range(parts)]
    heap = [(0, j) for j in range(parts)]
    for i in range(whole):
        load, j = heapq.heappop(heap)
        out[j].append((i, 1, 0))
        heapq.heappush(heap, (load + sizes[i], j))
    position = 0
    for i in range(whole, len(sizes)):
        for j in range(parts):
            offset = (j - position) % parts
            if offset < max(1, sizes[i]):
                out[j].append((i, parts, offset))
        position += sizes[i]
    return out


def most_batches(sizes: Sequence[int], parts: int, batch_size: int, cap: int) -> tuple[int, int]:
    """``(batches, whole)``: the most batches ``sum(load // batch_size)`` over the parts, at most ``cap``,
    over the choices of how many of ``sizes`` (largest first) ``deal`` gives whole, and the most whole among
    the choices that reach it. All whole is no choice when it would leave a part empty (fewer pieces than
    parts)."""
    loads, heap, rest = [0] * parts, [(0, j) for j in range(parts)], sum(sizes)
    best = (-1, 0)
    for whole in range(len(sizes) + 1):
        if whole:
            load, j = heapq.heappop(heap)
            loads[j] = load + sizes[whole - 1]
            heapq.heappush(heap, (loads[j], j))
            rest -= sizes[whole - 1]
        if 0 < whole == len(sizes) < parts:
            continue
        each, extra = divmod(rest, parts)  # the split stream: parts below `extra` take one more
        got = min(cap, sum((loads[j] + each + (j < extra)) // batch_size for j in range(parts)))
        if got >= best[0]:
            best = (got, whole)
    return best


def _sorted_shares(shares: list[Share], sizes: Sequence[int]) -> tuple[list[Share], list[int]]:
    """A rank's shares largest first (stable) and their sizes."""
    sized = sorted(((share_size(sizes[i], s, o), (i, s, o)) for i, s, o in shares), key=lambda t: -t[0])
    return [share for _, share in sized], [n for n, _ in sized]


@lru_cache(maxsize=16)
def exact_layout(
    sizes: tuple[int, ...], world_size: int, workers: int, batch_size: int, cap: int
) -> tuple[int, int, list[list[list[Share]]]]:
    """``(batches, whole, shares[rank][worker])`` of exact mode for shards of ``sizes`` (largest first): the
    ``whole`` largest dealt whole to ranks, the rest split by stride over all ranks; each rank likewise over
    its workers. ``whole`` is chosen for the most batches per rank (at most ``cap``; a rank's batches: the
    most its workers can fill with the best choice of its own split), the most whole among ties. Candidates
    are tried from all whole down, skipping those whose bound (least whole load + an even share of the split
    rest) cannot beat the best so far, and stopping at the bound of all (``total // world_size``). Cached (a
    plan per epoch and worker, the same sizes): callers must not change the lists."""
    total, count = sum(sizes), len(sizes)
    bounds, heap, rest = [], [0] * world_size, total
    for whole in range(count + 1):
        if whole:
            heapq.heapreplace(heap, heap[0] + sizes[whole - 1])
            rest -= sizes[whole - 1]
        bounds.append(min(cap, (heap[0] + -(-rest // world_size)) // batch_size))
    limit = min(cap, total // world_size // batch_size)
    best: tuple[int, int, list[tuple[list[Share], list[int]]]] = (-1, count, [])
    for whole in range(count, -1, -1):
        if bounds[whole] <= best[0]:
            continue
        ranks = [_sorted_shares(shares, sizes) for shares in deal(sizes, world_size, whole)]
        got = limit
        for _, share_sizes in ranks:  # the fewest any rank fills; stop once it cannot beat the best
            got = min(got, most_batches(share_sizes, workers, batch_size, limit)[0])
            if got <= best[0]:
                break
        if got > best[0]:
            best = (got, whole, ranks)
        if got >= limit:
            break
    batches, whole, ranks = best
    layout = []
    for shares, share_sizes in ranks:  # each rank splits as little as its share of `batches` allows
        mine = deal(share_sizes, workers, most_batches(share_sizes, workers, batch_size, batches)[1])
        layout.append([[compose(shares[j], s, o) for j, s, o in sub] for sub in mine])
    return batches, whole, layout


def compose(outer: Share, stride: int, offset: int) -> Share:
    """The share ``(stride, offset)`` of the samples of share ``outer``, as a share of its shard."""
    i, s, o = outer
    return (i, s * stride, o + s * offset)


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
    positions = sorted(order, key=lambda u: -sizes[u])  # largest first, the shuffle's order among ties
    batches, whole, layout = exact_layout(
        tuple(sizes[u] for u in positions), world_size, workers, batch_size, num_batches
    )
    pieces = [[[(positions[i], s, o) for i, s, o in shares] for shares in rank] for rank in layout]
    caps = [[sum(piece_size(p, sizes) for p in ps) // batch_size for ps in rank] for rank in pieces]
    quotas = [worker_share(batches, c) for c in caps]
    return Plan(pieces, quotas, batches, split_shards=len(urls) - whole)
