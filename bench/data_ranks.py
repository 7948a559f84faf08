"""The data path over 2 nodes x 2 ranks: each rank's loader rate, and that no sample is read twice.

Four spawned processes join one gloo process group as ranks 0-3 of a world of 4 (node = rank // 2, local
rank = rank % 2, set in the environment as a launcher would; the data plan needs only the rank and the world
size, which ``ShardDataModule`` takes from ``torch.distributed``). For each ``--workers`` count, in each of
``--repeats`` rounds, ``--epochs`` ``exact`` epochs of the default emoji latent shards are read through the
module's DataLoader (workers forked, as from a launcher's rank):

1. world 1: rank 0's second module, set up before the group started, reads whole epochs alone;
2. alone: each rank in turn reads its share while the other three wait (idle) in a barrier;
3. at once: the four ranks read their shares at the same time, the same keys as in 2.

Each rank's rate at once is given against its own read alone (the same work, same run, just before):

- samples/s: samples over wall time. Four ranks and their workers share this machine's cores (and other
  users' load), so this drops by the sharing, not by the data path.
- samples per CPU-s: over the user + system CPU of the rank's process and its workers. This is the figure
  that should hold (ratio ~1) when each rank has its own cores or node.

Rates are over whole epochs, from the loader's creation to its workers' exit (from the first batch on would
leave out the shuffle buffer's fill, most of a small share's reading). A rank's CPU per sample is above the
world-1 process's by the fixed cost per epoch (loader, worker start and exit) spread over a quarter of the
samples; the report splits CPU per epoch into fixed + per sample from the two uncontended reads.

After every read at once rank 0 gathers the keys over gloo and checks them against the tar members listed
independently: no key twice, none outside the dataset, every rank the same batch count, and the keys not
read exactly the samples the plan drops per epoch (ranks evened out to the fewest batches any can fill,
partial batches; ldm.data.plan splits shards so that this drop is small). It also counts the keys read at
least once over a repeat's epochs (the shuffle by epoch moves the drop). About 1.5 minutes on 2 busy cores.

    python bench/data_ranks.py [--repeats 3] [--epochs 3] [--workers 0,2] [--batch 64] [--shards PATTERN]
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import statistics
import tarfile
import time
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARDS = str(ROOT / "data/emoji32/latents/train-{000000..000007}.tar")
WORLD, RANKS_PER_NODE = 4, 2


def dataset_keys(urls: list[str]) -> set[str]:
    """Sample keys of the shards from their tar member names (not through the loader); a key in two shards
    raises."""
    counts: Counter[str] = Counter()
    for url in urls:
        with tarfile.open(url) as tar:
            counts.update(
                {m.name.rsplit("/", 1)[-1].split(".", 1)[0] for m in tar.getmembers() if m.isfile()}
            )
    twice = [k for k, n in counts.items() if n > 1]
    if twice:
        raise ValueError(f"keys in more than one shard, the check cannot tell them apart: {twice[:5]}")
    return set(counts)


def check_keys(per_rank: list[list[str]], dataset: set[str], used: int) -> int:
    """One epoch's keys of every rank: none twice, none foreign, ``used`` in all (the plan's count). Returns
    the samples of the dataset not read this epoch."""
    counts = Counter(k for keys in per_rank for k in keys)
    twice = [k for k, n in counts.items() if n > 1]
    foreign = set(counts) - dataset
    assert not twice, f"keys read more than once: {twice[:5]}"
    assert not foreign, f"keys not in the dataset: {sorted(foreign)[:5]}"
    assert len(counts) == used, f"{len(counts)} keys read, the plan uses {used}"
    return len(dataset) - len(counts)


def cpu_now() -> float:
    """User + system CPU seconds of this process and of its children reaped so far (the loader joins its
    workers at the end of each epoch)."""
    use = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + use.ru_utime + use.ru_stime


def read_epochs(dm, epochs: int) -> dict:
    """``epochs`` whole epochs of ``dm``'s train loader, each from the loader's creation to its workers'
    exit: keys per epoch, samples, wall and CPU seconds."""
    keys, wall, cpu = [], 0.0, 0.0
    for epoch in range(epochs):
        dm.train_dataset.set_epoch(epoch)
        start, start_cpu = time.perf_counter(), cpu_now()
        keys.append([k for batch in dm._loader(dm.train_dataset) for k in batch["__key__"]])
        wall += time.perf_counter() - start
        cpu += cpu_now() - start_cpu
    samples = sum(map(len, keys))
    return {
        "keys": keys,
        "samples": samples,
        "wall": wall,
        "cpu": cpu,
        "batches": len(keys[0]) // dm.batch_size,
    }


def rank_main(rank: int, port: int, args: argparse.Namespace) -> None:
    """(spawned) rank ``rank`` of the gloo group; rank 0 also reads the whole epoch alone, and reports."""
    import multiprocessing

    import torch
    import torch.distributed as dist

    from ldm.data.datamodule import ShardDataModule

    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(WORLD),
        LOCAL_RANK=str(rank % RANKS_PER_NODE),
        NODE_RANK=str(rank // RANKS_PER_NODE),
        LOCAL_WORLD_SIZE=str(RANKS_PER_NODE),
    )
    torch.set_num_threads(1)
    # DataLoader workers forked, as from a launcher's rank (this process was spawned, and its children would
    # be too: a fresh interpreter and imports per worker and epoch)
    multiprocessing.set_start_method("fork", force=True)
    workers = [int(w) for w in args.workers.split(",")]

    def module(w: int) -> ShardDataModule:
        dm = ShardDataModule(args.shards, kind="latents", batch_size=args.batch, num_workers=w, mode="exact")
        dm.setup("fit")  # rank and world size from torch.distributed once the group is up, else 0 of 1
        return dm

    whole = {w: module(w) for w in workers} if rank == 0 else {}  # before the group: world size 1
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    ranked = {w: module(w) for w in workers}
    assert all(dm.train_dataset.world_size == WORLD for dm in ranked.values())
    for w in workers:  # warm-up: lazy imports, page cache
        for dm in [*whole.values(), ranked[w]]:
            read_epochs(dm, 1)
    dataset = dataset_keys(ranked[workers[0]].train_urls) if rank == 0 else set()
    ref: dict[int, list[dict]] = defaultdict(list)
    runs: dict[tuple[int, int], list[tuple[dict, dict]]] = defaultdict(list)
    dropped: dict[int, set[int]] = defaultdict(set)
    covered: dict[int, list[int]] = defaultdict(list)
    for _ in range(args.repeats):
        for w in workers:
            dist.barrier()
            if rank == 0:
                ref[w].append(read_epochs(whole[w], args.epochs))
            for r in range(WORLD):  # each rank's share alone, the others waiting (idle) in the barrier
                dist.barrier()
                if rank == r:
                    solo = read_epochs(ranked[w], args.epochs)
            dist.barrier()  # all four start together
            both = read_epochs(ranked[w], args.epochs)
            assert both["keys"] == solo["keys"], "a rank read other keys with the others running"
            gathered: list | None = [None] * WORLD if rank == 0 else None
            dist.gather_object((solo, both), gathered, dst=0)
            if rank == 0:
                used = ranked[w].train_dataset.plan(ranked[w].num_workers).samples_used(args.batch)
                assert len({g[1]["batches"] for g in gathered}) == 1, "ranks read different batch counts"
                for epoch in range(args.epochs):
                    dropped[w].add(check_keys([g[1]["keys"][epoch] for g in gathered], dataset, used))
                covered[w].append(len({k for g in gathered for keys in g[1]["keys"] for k in keys}))
                for r, g in enumerate(gathered):
                    runs[w, r].append(g)
    if rank == 0:
        report(args, workers, ranked, ref, runs, dropped, covered, len(dataset))
    dist.barrier()
    dist.destroy_process_group()


def spread(values: list[float], fmt: str) -> str:
    return f"{statistics.median(values):{fmt}} ({min(values):{fmt}}-{max(values):{fmt}})"


def report(args, workers, ranked, ref, runs, dropped, covered, total) -> None:
    head = [
        "node",
        "rank",
        "workers",
        "samples/epoch",
        "samples/s",
        "/ alone",
        "samples per CPU-s",
        "/ alone",
    ]
    rows, fits = [], []
    for w in workers:
        wall_ref = [r["samples"] / r["wall"] for r in ref[w]]
        cpu_ref = [r["samples"] / r["cpu"] for r in ref[w]]
        n_whole = len(ref[w][0]["keys"][0])
        rows.append(
            ["-", "world 1", str(w), str(n_whole), spread(wall_ref, ",.0f"), "", spread(cpu_ref, ",.0f"), ""]
        )
        for r in range(WORLD):
            solo, both = zip(*runs[w, r], strict=True)
            wall = [g["samples"] / g["wall"] for g in both]
            cpu = [g["samples"] / g["cpu"] for g in both]
            rows.append(
                [
                    str(r // RANKS_PER_NODE),
                    str(r),
                    str(ranked[w].num_workers),
                    str(len(both[0]["keys"][0])),
                    spread(wall, ",.0f"),
                    spread([a * g["wall"] / g["samples"] for a, g in zip(wall, solo, strict=True)], ".2f"),
                    spread(cpu, ",.0f"),
                    spread([a * g["cpu"] / g["samples"] for a, g in zip(cpu, solo, strict=True)], ".2f"),
                ]
            )
        # CPU per epoch = fixed + samples x per-sample, from the uncontended reads: a lone rank's share, the
        # whole epoch (world 1)
        n_rank = statistics.mean(len(runs[w, r][0][0]["keys"][0]) for r in range(WORLD))
        c_rank = statistics.median(g[0]["cpu"] for r in range(WORLD) for g in runs[w, r]) / args.epochs
        c_whole = statistics.median(r["cpu"] for r in ref[w]) / args.epochs
        per_sample = (c_whole - c_rank) / (n_whole - n_rank)
        fits.append((w, 1e3 * (c_rank - n_rank * per_sample), 1e6 * per_sample))
    print(
        f"\n{WORLD // RANKS_PER_NODE} nodes x {RANKS_PER_NODE} ranks (gloo, {WORLD} processes at once); "
        f"exact mode, {args.shards.rsplit('/', 1)[-1]}, batch {args.batch}, {args.epochs} whole epoch(s) per "
        f"read, {args.repeats} interleaved repeats, median (min-max); {os.cpu_count()} cores, load average "
        f"{os.getloadavg()[0]:.1f}. / alone: against the same rank reading the same share by itself (the "
        "others idle in a barrier) just before. world 1: one process reading the whole epoch."
    )
    widths = [max(len(row[i]) for row in [head, *rows]) for i in range(len(head))]
    for row in [head, ["-" * n for n in widths], *rows]:
        print("| " + " | ".join(c.rjust(n) for c, n in zip(row, widths, strict=True)) + " |")
    for w, fixed, per_sample in fits:
        split = ranked[w].train_dataset.plan(ranked[w].num_workers).split_shards
        print(
            f"{w} workers: CPU per epoch ~ {fixed:.0f} ms fixed (loader, workers) + {per_sample:.0f} us per "
            f"sample (world 1 vs a lone rank). Every epoch of every repeat the {WORLD} ranks' keys are "
            f"disjoint and within the {total} of the shards; not read: {sorted(dropped[w])} per epoch, the "
            f"plan's drop; read at least once over a repeat's {args.epochs} epochs: "
            f"{min(covered[w])}-{max(covered[w])}; shards split between ranks: {split}"
        )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3, help="epochs per timed read")
    parser.add_argument("--workers", default="0,2", help="DataLoader workers per rank, comma-separated")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--shards", default=SHARDS)
    args = parser.parse_args()
    import torch.multiprocessing as mp

    start = time.perf_counter()
    mp.spawn(rank_main, args=(free_port(), args), nprocs=WORLD)
    print(f"({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
