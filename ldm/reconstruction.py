"""Does the frozen autoencoder reconstruct *these* images? Checked before latents are made or trained on.

An autoencoder trained on one kind of image can fail silently on another (the shipped emoji autoencoder gives
28 dB PSNR on emoji and 2-3 dB on dark photos: black comes back yellow). The latent diffusion model then
trains normally and every sample has the wrong colours. ``reconstruction_check`` encodes and decodes the first
images of the user's shards, logs the PSNR, and warns loudly below a threshold, naming the fixes.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

from ldm.autoencoder.frozen import FrozenAutoencoder
from ldm.autoencoder.loss import psnr
from ldm.data.image_batches import image_batches
from ldm.data.rgb import parse_background
from ldm.data.shards import SkipCounter
from ldm.data.urls import expand_urls

log = logging.getLogger(__name__)

MIN_PSNR_DB = 20.0
FIX = (
    "train a stage-1 autoencoder on your images (README: 'Train a stage-1 KL autoencoder on image shards') "
    "or use a general-purpose VAE (--autoencoder diffusers:<dir or hub id>, autoencoder=diffusers)"
)


@torch.no_grad()
def reconstruction_check(
    pattern: str | list[str],
    ae: FrozenAutoencoder,
    image_size: int,
    num_images: int = 64,
    min_psnr_db: float = MIN_PSNR_DB,
    batch_size: int = 16,
    background: str | Sequence[int] = "white",
) -> dict[str, Any]:
    """PSNR (dB, images in [-1, 1]) of ``ae``'s reconstructions of the first ``num_images`` images of the
    shards.

    Returns {"psnr_db": mean, "worst_db", "n", "min_psnr_db", "ok"}; logs it, and warns below ``min_psnr_db``.
    """
    urls = expand_urls(pattern) if isinstance(pattern, str) else list(pattern)
    device = next(ae.parameters()).device
    scores: list[torch.Tensor] = []
    counter = SkipCounter("reconstruction check")
    for batch in image_batches(
        urls, image_size, batch_size, counter, background=parse_background(background)
    ):
        x = torch.stack([s["image"] for s in batch])[: num_images - sum(len(t) for t in scores)].to(device)
        recon = ae.decode(ae.encode(x)).float().clamp(-1, 1)  # (B, 3, H, W) in [-1, 1]
        scores.append(psnr(x.float(), recon).cpu())  # (B,)
        if sum(len(t) for t in scores) >= num_images:
            break
    if not scores:
        raise ValueError(f"reconstruction check: no decodable image in {urls[0]}...: check the shards")
    values = torch.cat(scores)
    result = {
        "psnr_db": round(float(values.mean()), 2),
        "worst_db": round(float(values.min()), 2),
        "n": int(values.numel()),
        "min_psnr_db": min_psnr_db,
        "ok": bool(values.mean() >= min_psnr_db),
    }
    name = ae.identity.get("name", "the autoencoder")
    if result["ok"]:
        log.info(
            "autoencoder %s reconstructs %d of these images at %.1f dB PSNR (worst %.1f dB)",
            name,
            result["n"],
            result["psnr_db"],
            result["worst_db"],
        )
    else:
        log.warning(
            "!! autoencoder %s reconstructs these images at only %.1f dB PSNR (mean of %d; worst %.1f dB; "
            "below %.0f dB): every sample of a model trained on these latents will inherit its errors (e.g. "
            "wrong colours) — %s",
            name,
            result["psnr_db"],
            result["n"],
            result["worst_db"],
            min_psnr_db,
            FIX,
        )
    return result


@torch.no_grad()
def encoded_channel_stats(
    pattern: str | list[str],
    ae: FrozenAutoencoder,
    image_size: int,
    num_images: int = 512,
    batch_size: int = 64,
    background: str | Sequence[int] = "white",
) -> dict[str, list[float]]:
    """Per-channel mean/std of ``ae``'s scaled latents of the first ``num_images`` images of the shards, in
    shard order (the same on every rank): ``model.latent_norm=per_channel`` on image shards, whose index has
    no stats."""
    urls = expand_urls(pattern) if isinstance(pattern, str) else list(pattern)
    device = next(ae.parameters()).device
    total = total_sq = None
    n = 0
    counter = SkipCounter("latent statistics")
    for batch in image_batches(
        urls, image_size, batch_size, counter, background=parse_background(background)
    ):
        x = torch.stack([s["image"] for s in batch])[: num_images - n].to(device)
        z = ae.encode(x).double()  # (B, C, h, w)
        total = z.sum((0, 2, 3)) if total is None else total + z.sum((0, 2, 3))
        total_sq = (z * z).sum((0, 2, 3)) if total_sq is None else total_sq + (z * z).sum((0, 2, 3))
        n += len(x)
        count = n * z.shape[2] * z.shape[3]
        if n >= num_images:
            break
    if total is None or n < 2:
        raise ValueError(
            f"latent statistics: fewer than 2 decodable images in {urls[0]}...: check the shards"
        )
    mean = total / count
    std = (total_sq / count - mean * mean).clamp_min(0).sqrt()
    log.info(
        "latent statistics of %d images: channel means %s, stds %s",
        n,
        [round(float(m), 4) for m in mean],
        [round(float(s), 4) for s in std],
    )
    return {"channel_mean": mean.tolist(), "channel_std": std.tolist(), "count": n}
