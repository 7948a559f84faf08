"""What eval.py spends its time on: Inception features per image, the Fréchet distance in 2048-d (ours, by
eigh, against scipy's sqrtm in the same run), KID, and optionally sampling per image from a checkpoint.

    python bench/eval_speed.py [--device cpu] [--batch 1 16 32] [--ckpt logs/.../last.ckpt --steps 25]

Prints a table and an estimate of eval.py's wall time for n images per (checkpoint, CFG scale).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np
import scipy.linalg
import torch
from omegaconf import OmegaConf

from ldm.evaluation import (
    InceptionV3Features,
    TinyFeatures,
    frechet_distance,
    gaussian_stats,
    kernel_distance,
)

log = logging.getLogger("bench")


def timed(fn, repeat: int = 1) -> float:
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def feature_rows(device: torch.device, batches: list[int]) -> list[tuple[str, float]]:
    inception, tiny = InceptionV3Features(device=device), TinyFeatures(device=device)
    rows = []
    for bs in batches:
        images = torch.rand(bs, 3, 32, 32)
        inception(images[:1])  # warm-up
        rows.append((f"inception features, batch {bs} (s/image)", timed(lambda x=images: inception(x)) / bs))
    images = torch.rand(64, 3, 32, 32)
    rows.append(("tiny features, batch 64 (s/image)", timed(lambda: tiny(images), 3) / 64))
    return rows


def plain_fid(a, b) -> float:
    covmean = scipy.linalg.sqrtm(a.sigma @ b.sigma).real
    d = a.mu - b.mu
    return float(d @ d + np.trace(a.sigma) + np.trace(b.sigma) - 2 * np.trace(covmean))


def metric_rows(n: int = 2500, d: int = 2048) -> list[tuple[str, float]]:
    rng = np.random.default_rng(0)
    x, y = np.abs(rng.normal(size=(n, d))), np.abs(rng.normal(size=(n, d)) + 0.1)
    a, b = gaussian_stats(x), gaussian_stats(y)
    t_ours_cold = timed(lambda: frechet_distance(a, b))  # includes sqrt of a.sigma (then cached)
    t_ours_warm = timed(lambda: frechet_distance(a, b))
    t_scipy = timed(lambda: plain_fid(a, b))
    rel = abs(frechet_distance(a, b) - plain_fid(a, b)) / plain_fid(a, b)
    t_kid = timed(lambda: kernel_distance(x, y))
    return [
        (f"FID {d}-d, eigh, first (s)", t_ours_cold),
        (f"FID {d}-d, eigh, reference root cached (s)", t_ours_warm),
        (f"FID {d}-d, scipy sqrtm (s)", t_scipy),
        ("sqrtm / eigh-first time ratio", t_scipy / t_ours_cold),
        ("|eigh - sqrtm| / sqrtm", rel),
        (f"KID 100 subsets of 1000, {d}-d (s)", t_kid),
    ]


def sampling_row(ckpt: str, steps: int, device: torch.device, batch: int) -> tuple[str, float]:
    from ldm.generate import generate
    from ldm.instantiate import build
    from ldm.lit.loading import load_for_sampling
    from ldm.sampling.grids import sampling_sigmas

    model = load_for_sampling(Path(ckpt), True, device)
    sampler = build(OmegaConf.create(model.sampler_config))
    sigmas = sampling_sigmas(model.denoiser.schedule, steps)
    prompts = ["red apple"] * batch

    def run() -> None:
        generate(
            model.denoiser,
            model.conditioner,
            model.decode_samples,
            prompts,
            sampler=sampler,
            sigmas=sigmas,
            latent_shape=model.latent_shape,
            seeds=list(range(batch)),
            cfg_scale=5.0,
        )

    run()
    return (f"sampling, {steps} steps, CFG, batch {batch} (s/image)", timed(run) / batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16, 32])
    parser.add_argument("--ckpt", default=None, help="also time sampling from this checkpoint")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--n", type=int, default=2000, help="images per point for the estimate")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    device = torch.device(args.device)
    rows = feature_rows(device, args.batch) + metric_rows()
    if args.ckpt:
        rows.append(sampling_row(args.ckpt, args.steps, device, 32))
    width = max(len(name) for name, _ in rows)
    log.info("torch threads %d, device %s", torch.get_num_threads(), device)
    for name, value in rows:
        log.info("%-*s  %10.4g", width, name, value)
    per_image = dict(rows)[f"inception features, batch {max(args.batch)} (s/image)"]
    if args.ckpt:
        per_image += rows[-1][1]
    fid = (
        dict(rows)["FID 2048-d, eigh, reference root cached (s)"]
        + dict(rows)["KID 100 subsets of 1000, 2048-d (s)"]
    )
    log.info(
        "estimate per (checkpoint, CFG scale) at n=%d: %.0f s (%s)",
        args.n,
        args.n * per_image + fid,
        "sampling + features + metrics" if args.ckpt else "features + metrics; sampling not timed",
    )


if __name__ == "__main__":
    main()
