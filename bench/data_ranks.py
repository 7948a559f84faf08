"""The data path over 2 nodes x 2 ranks: each rank's loader rate, and that no sample is read twice.

Four processes play ranks 0-3 of a world of 4 (node = rank // 2; the data plan needs only the rank and the
world size, no collective), each reading its share of one ``exact`` epoch of the default emoji latent shards
through ``ShardDataModule`` with ``--workers`` DataLoader workers, all at the same time. The reference is one
rank alone (world size 1) reading the whole epoch, interleaved with the 4-rank runs over ``--repeats`` rounds.
Rates are samples per CPU-second of the rank's process and its workers (per-core rate: this box has fewer
cores than 4 ranks x workers, so wall rates only show the sharing); the table gives each rank's rate against
the lone rank's, and the key check: every key read once at most over all ranks, and every rank the same batch
count.

    python bench/data_ranks.py [--repeats 3] [--workers 0] [--shards PATTERN]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
SHARDS = str(ROOT / "data/emoji32/latents/train-{000000..000007}.tar")


def cpu_seconds(pids: list[int]) -> float:
    own = os.times()
    total = own.user + own.system
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def read_rank(args: tuple[str, int, int, int, int]) -> dict:
    """(in a process) one epoch of rank ``rank`` of ``world``: keys read, batches, samples per CPU-second."""
    import torch

    from ldm.data.datamodule import ShardDataModule

    shards, rank, world, workers, batch = args
    torch.set_num_threads(1)
    dm = ShardDataModule(shards, kind="latents", batch_size=batch, num_workers=workers, mode="exact")
    dm.trainer = SimpleNamespace(global_rank=rank, world_size=world, num_devices=2)  # the plan reads these
    dm.setup("fit")
    dm.train_dataset.set_epoch(0)
    keys: list[str] = []
    start_wall, start_cpu, pids = time.perf_counter(), 0.0, []
    end_cpu = 0.0
    for i, b in enumerate(dm._loader(dm.train_dataset)):
        if i == 0:
            pids = [c.pid for c in multiprocessing.active_children()]
            start_cpu = cpu_seconds(pids)
        keys += b["__key__"]
        end_cpu = cpu_seconds(pids)
    n = len(keys) - batch  # from the first batch on
    return {
        "rank": rank,
        "keys": keys,
        "batches": len(keys) // batch,
        "wall": time.perf_counter() - start_wall,
        "per_cpu_s": n / max(end_cpu - start_cpu, 1e-9),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--shards", default=SHARDS)
    args = parser.parse_args()
    ctx = multiprocessing.get_context("spawn")
    alone: list[float] = []
    ranks: dict[int, list[float]] = {r: [] for r in range(4)}
    checks = []
    with ctx.Pool(4) as pool:
        pool.map(read_rank, [(args.shards, 0, 1, 0, args.batch)] * 4)  # warm-up: imports, page cache
        for _ in range(args.repeats):
            alone.append(pool.apply(read_rank, ((args.shards, 0, 1, args.workers, args.batch),))["per_cpu_s"])
            results = pool.map(read_rank, [(args.shards, r, 4, args.workers, args.batch) for r in range(4)])
            counts = Counter(k for res in results for k in res["keys"])
            checks.append((max(counts.values()), {res["batches"] for res in results}, sum(counts.values())))
            for res in results:
                ranks[res["rank"]].append(res["per_cpu_s"])
    print(
        f"\n2 nodes x 2 ranks (4 processes at once) vs 1 rank alone, exact mode, default emoji latent "
        f"shards, batch {args.batch}, {args.workers} workers per rank, {args.repeats} interleaved repeats; "
        f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}"
    )
    print("| rank (node) | samples per CPU-s, median (min-max) | / rank alone, median (min-max) |")
    print("| ----------- | ----------------------------------- | ------------------------------ |")
    print(
        f"| alone (1 rank) | {statistics.median(alone):,.0f} ({min(alone):,.0f}-{max(alone):,.0f}) | 1.00 |"
    )
    for r, rates in ranks.items():
        ratio = [a / b for a, b in zip(rates, alone, strict=True)]
        print(
            f"| {r} ({r // 2}) | {statistics.median(rates):,.0f} ({min(rates):,.0f}-{max(rates):,.0f}) | "
            f"{statistics.median(ratio):.2f} ({min(ratio):.2f}-{max(ratio):.2f}) |"
        )
    most, batches, total = checks[-1]
    print(
        f"\nmost reads of one key over all ranks: {max(c[0] for c in checks)} (every repeat); batches per "
        f"rank: {sorted(batches)}; samples read per epoch: {total}"
    )


if __name__ == "__main__":
    main()
