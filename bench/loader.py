"""Shard loader throughput alone (no model): samples/s per core against the goal of 2,000 latent
samples/s/core.

Writes synthetic latent shards (fp16, with and without 77x384 fp16 text embeddings) to a temporary folder,
reads them through ``ShardDataset`` + ``DataLoader`` (batch 64, shuffle buffer 500) with 0 workers (one core)
and 2 workers, and prints a table: wall-clock samples/s, and samples per CPU-second of the loader's processes
(the per-core rate, unaffected by whatever else shares the machine). Also: the raw tar read rate of our reader
against webdataset's, and the peak RSS growth while reading the same samples from 10 vs 1,000 shards (each
case in a fresh process).

    OMP_NUM_THREADS=1 python bench/loader.py [--samples 3000] [--emb-tokens 77]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import webdataset as wds
from torch.utils.data import DataLoader

from ldm.data import ShardDataset, SkipCounter, write_shards
from ldm.data.tar_reader import raw_samples

GOAL = 2000.0  # latent samples/s per core, 4x32x32 fp16
BATCH = 64


def make_shards(root: Path, n: int, shape: tuple[int, ...], emb_tokens: int, per_shard: int) -> list[str]:
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((16, *shape)).astype(np.float16)  # reused: the bytes differ only by key
    embs = rng.standard_normal((16, emb_tokens, 384)).astype(np.float16) if emb_tokens else None

    def samples():  # noqa: ANN202
        for i in range(n):
            s = {
                "__key__": f"{i:07d}",
                "latent.npy": latents[i % 16],
                "txt": f"a synthetic caption number {i}",
            }
            if embs is not None:
                s["emb.npy"] = embs[i % 16]
            yield s

    meta = {"latent_shape": list(shape), "latent_dtype": "float16"}
    return write_shards(samples(), str(root), max_per_shard=per_shard, meta=meta)


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of this process and of the given live child processes."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    total = own.ru_utime + own.ru_stime
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime
    return total


def loader_rate(paths: list[str], n: int, shape: tuple[int, ...], workers: int) -> tuple[float, float]:
    """(samples/s of wall time, samples per CPU-second of the main process and the workers) over two passes.

    Both are measured from the first batch on (worker start-up excluded). The second is the per-core rate
    whatever else the machine runs: the CPU the loader spent, not the wall time it waited for a core.
    """
    ds = ShardDataset(
        paths,
        "latents",
        batch_size=BATCH,
        num_batches=2 * n // BATCH,
        latent_shape=shape,
        latent_dtype="float16",
        shuffle_buffer=500,
        mode="cycle",
    )
    count, start, pids, cpu_start, cpu_end = 0, 0.0, [], 0.0, 0.0
    for i, batch in enumerate(DataLoader(ds, batch_size=None, num_workers=workers)):
        if i == 0:
            pids = [child.pid for child in multiprocessing.active_children()]
            start, cpu_start = time.perf_counter(), cpu_seconds(pids)
            continue
        count += batch["latent"].shape[0]
        cpu_end = cpu_seconds(pids)  # the workers end with the loop: read them while they live
    return count / (time.perf_counter() - start), count / (cpu_end - cpu_start)


def raw_rates(paths: list[str]) -> tuple[float, float]:
    """Raw samples/s (tar parsing and grouping only): ours vs webdataset.tariterators.tarfile_samples."""
    start = time.perf_counter()
    ours = sum(1 for _ in raw_samples(paths, SkipCounter()))
    mid = time.perf_counter()
    theirs = sum(1 for _ in wds.tariterators.tarfile_samples([{"url": p} for p in paths]))
    end = time.perf_counter()
    return ours / (mid - start), theirs / (end - mid)


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def rss_case(folder: str) -> None:
    """(child process) peak RSS growth in MiB over one pass of the shards in ``folder``."""
    paths = sorted(str(p) for p in Path(folder).glob("train-*.tar"))
    total = json.loads((Path(folder) / "train.json").read_text())["total"]
    ds = ShardDataset(paths, "latents", batch_size=BATCH, num_batches=total // BATCH, shuffle_buffer=500)
    base = peak = rss_kib()
    for _ in DataLoader(ds, batch_size=None, num_workers=0):
        peak = max(peak, rss_kib())
    print(json.dumps({"shards": len(paths), "samples": total, "rss_growth_mib": (peak - base) / 1024}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=3000)
    parser.add_argument("--emb-tokens", type=int, default=77)
    parser.add_argument("--rss-case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_case:
        return rss_case(args.rss_case)
    n = args.samples
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in (32, 64):
            for emb in (0, args.emb_tokens):
                shape = (4, size, size)
                folder = Path(tmp) / f"{size}_{emb}"
                paths = make_shards(folder, n, shape, emb, per_shard=500)
                mb = sum(Path(p).stat().st_size for p in paths) / 2**20
                (w0, c0), (w2, c2) = (loader_rate(paths, n, shape, w) for w in (0, 2))
                rows.append((f"4x{size}x{size}" + (f" + emb {emb}x384" if emb else ""), mb, w0, c0, w2, c2))
                if size == 32 and not emb:
                    ours, theirs = raw_rates(paths)
        print(
            f"\nloader alone: {n} synthetic fp16 samples read twice, batch {BATCH}, shuffle buffer 500, "
            "page cache warm, from the first batch on"
        )
        print(
            "wall: samples/s; per core: samples per CPU-second of the main process + workers; /goal: per "
            "core / goal"
        )
        print(
            f"{'shards':<24}{'MB':>5}{'0 workers: wall':>17}{'per core':>10}{'/goal':>7}"
            f"{'2 workers: wall':>17}{'per core':>10}{'/goal':>7}"
        )
        for name, mb, w0, c0, w2, c2 in rows:
            print(
                f"{name:<24}{mb:>5.0f}{w0:>17,.0f}{c0:>10,.0f}{c0 / GOAL:>6.1f}x"
                f"{w2:>17,.0f}{c2:>10,.0f}{c2 / GOAL:>6.1f}x"
            )
        print(
            f"goal: {GOAL:,.0f} latent samples/s per core (4x32x32 fp16); cores here: {os.cpu_count()}, "
            f"load average {os.getloadavg()[0]:.1f}"
        )
        print(
            f"raw tar read, 4x32x32: ours {ours:,.0f} samples/s, webdataset tarfile_samples {theirs:,.0f} "
            f"samples/s ({ours / theirs:.1f}x)"
        )

        print("\npeak RSS growth over one pass, same 5,000 samples (4x32x32 fp16), 0 workers:")
        for shards in (10, 1000):
            folder = Path(tmp) / f"rss_{shards}"
            make_shards(folder, 5000, (4, 32, 32), 0, per_shard=5000 // shards)
            out = subprocess.run(
                [sys.executable, __file__, "--rss-case", str(folder)],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            result = json.loads(out.strip().splitlines()[-1])
            print(f"  {result['shards']:>5} shards: {result['rss_growth_mib']:6.1f} MiB")
    return None


if __name__ == "__main__":
    main()
