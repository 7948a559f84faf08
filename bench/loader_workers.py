"""The DataLoader's cost per sample on the default shards: 0, 1, 2 and 4 workers, float32 vs float16 from
workers.

Reads the built-in emoji shards (``python prepare.py emoji`` first) through ``ShardDataModule`` exactly as
training does: latent shards (4x8x8 fp16 latents + 32x384 fp16 MiniLM embeddings) and image shards (32x32 PNG,
decoded in the loader). For each setting, interleaved over ``--repeats`` rounds, one loader pass of
``--batches`` batches; measured from the first batch on (worker start-up excluded) and reported per repeat as
- CPU us per sample: user + system CPU of the main process and its workers per sample read, the cost that
  competes with training for the cores whatever else runs on the machine;
- wall us per sample of the main process (what a training loop waits when it has nothing else to do).
The reference is 0 workers (all in the main process); ratios per repeat, median (min-max).
``worker_dtype=float16`` includes the main process's cast back to float32.

Pinned memory: on a CPU-only machine ``pin_memory=True`` is a no-op that PyTorch warns about, so it is not
timed here; ``data.pin_memory=auto`` pins only when the trainer's device is an accelerator.

    python bench/loader_workers.py [--repeats 5] [--batches 40] [--workers 0,1,2,4] [--kinds latents,images]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch

from ldm.data.datamodule import ShardDataModule

ROOT = Path(__file__).resolve().parents[1]
SHARDS = {
    "latents": ROOT / "data/emoji32/latents/train-{000000..000007}.tar",
    "images": ROOT / "data/emoji32/images/train-{000000..000007}.tar",
}


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of this process and of the given live child processes."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    total = own.ru_utime + own.ru_stime
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime
    return total


def one_pass(kind: str, workers: int, dtype: str, batches: int) -> tuple[float, float]:
    """(CPU us per sample, wall us per sample) over one loader pass, from the first batch on."""
    dm = ShardDataModule(
        str(SHARDS[kind]),
        kind=kind,
        batch_size=64,
        num_workers=workers,
        mode="cycle",
        train_samples=64 * (batches + 1),
        worker_dtype=dtype,
        pin_memory=False,
    )
    dm.setup("fit")
    dm.set_epoch(0)
    count, start, pids, cpu_start, cpu_end = 0, 0.0, [], 0.0, 0.0
    for i, batch in enumerate(dm.train_dataloader()):
        batch = dm.on_after_batch_transfer(batch, 0)  # the cast back of float16 batches
        if i == 0:
            pids = [child.pid for child in multiprocessing.active_children()]
            start, cpu_start = time.perf_counter(), cpu_seconds(pids)
            continue
        count += batch[kind[:-1] if kind == "images" else "latent"].shape[0]
        cpu_end = cpu_seconds(pids)  # the workers end with the loop: read them while they live
    return 1e6 * (cpu_end - cpu_start) / count, 1e6 * (time.perf_counter() - start) / count


def spread(values: list[float], fmt: str = ".2f") -> str:
    return f"{statistics.median(values):{fmt}} ({min(values):{fmt}}-{max(values):{fmt}})"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--workers", default="0,1,2,4")
    parser.add_argument("--kinds", default="latents,images")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the loader alone; the workers run one thread each (DataLoader sets it)
    settings = [
        (kind, w, dtype)
        for kind in args.kinds.split(",")
        for w in map(int, args.workers.split(","))
        for dtype in (("float32", "float16") if w else ("float32",))
    ]
    cpu: dict[tuple, list[float]] = defaultdict(list)
    wall: dict[tuple, list[float]] = defaultdict(list)
    for s in settings:  # warm-up: page cache, imports
        one_pass(s[0], s[1], s[2], 3)
    for _ in range(args.repeats):
        for s in settings:
            c, w = one_pass(*s, args.batches)
            cpu[s].append(c)
            wall[s].append(w)
    print(
        f"\nloader cost per sample, default emoji shards, batch 64, {args.batches} batches per pass, "
        f"{args.repeats} interleaved repeats; {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}"
    )
    head = [
        "shards",
        "workers",
        "worker dtype",
        "CPU us/sample",
        "CPU / 0 workers",
        "wall us/sample",
        "wall / 0 workers",
    ]
    rows = []
    for s in settings:
        ref = (s[0], 0, "float32")
        rc = [a / b for a, b in zip(cpu[s], cpu[ref], strict=True)]
        rw = [a / b for a, b in zip(wall[s], wall[ref], strict=True)]
        rows.append(
            [
                s[0],
                str(s[1]),
                s[2],
                spread(cpu[s], ".1f"),
                spread(rc) + "x",
                spread(wall[s], ".1f"),
                spread(rw) + "x",
            ]
        )
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    for row in [head, ["-" * w for w in widths], *rows]:
        print("| " + " | ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) + " |")


if __name__ == "__main__":
    main()
