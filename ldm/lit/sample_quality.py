"""Sample quality during training: every N steps and/or at the last step, FID / KID (+ CLIP score) of K images
sampled with the EMA weights, against the validation shards, logged as eval/fid, eval/kid, eval/kid_std
(eval/clip_score) to every logger and into callback_metrics (``ModelCheckpoint(monitor="eval/fid")``, early
stopping and ``optimized_metric=eval/fid`` can use them).

Prompts are the validation captions (image i: caption i mod n, seed ``seed + i``), so every evaluation of a
run scores the same prompts and noise. The reference statistics are computed once per (shards, n, image size,
autoencoder or background, extractor) and cached as ``ref_stats_<hash>.npz`` beside the shards (or in the run
directory when that folder is not writable). Each evaluation is also appended to
``<run dir>/eval_during_training.jsonl`` with n, sampler, steps, CFG scale, seed and EMA, since FIDs compare
only at equal settings.

With several ranks (DDP, FSDP) every rank samples a share of the batches (under FSDP with the whole model
gathered) and rank 0 scores them all: the same images, so the same numbers, as on one process.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import lightning as L
import torch

from ldm.conditioning.multi import sampling_inputs
from ldm.data.rgb import parse_background
from ldm.data.urls import expand_urls
from ldm.evaluation import EXTRACTORS, ClipScorer, build_extractor, load_or_compute
from ldm.generate import generate, latent_shape
from ldm.lit.ema import EMA
from ldm.lit.preemption import GracefulStop
from ldm.lit.sharded import full_params
from ldm.quality import reference_batches, reference_identity, score_features, shard_captions, shard_kind
from ldm.sampling.grids import sampling_sigmas
from ldm.sampling.registry import check_sampler

log = logging.getLogger(__name__)


class SampleQuality(L.Callback):
    def __init__(
        self,
        sampler: Callable[..., torch.Tensor],
        image_size: int,
        num_samples: int = 200,
        every_n_steps: int = 0,
        at_end: bool = True,
        extractor: str = "inception",
        steps: int = 25,
        spacing: str | None = None,
        cfg_scale: float = 5.0,
        seed: int = 0,
        batch_size: int = 50,
        shards: str | None = None,
        max_ref_images: int = 2000,
        kid_subsets: int = 50,
        kid_subset_size: int = 1000,
        clip_model: str | None = None,
        use_ema: bool = True,
        alpha_background: str = "white",
    ) -> None:
        if num_samples < 2 or batch_size < 1:
            raise ValueError(
                f"callbacks.sample_quality: num_samples={num_samples} (>= 2) and batch_size={batch_size} (>= "
                f"1)"
            )
        if extractor not in EXTRACTORS:
            raise ValueError(
                f"callbacks.sample_quality.extractor={extractor!r}: use one of {sorted(EXTRACTORS)}"
            )
        self.sampler, self.image_size, self.num_samples = sampler, int(image_size), num_samples
        self.every_n_steps, self.at_end, self.extractor_name = every_n_steps, at_end, extractor
        self.steps, self.spacing, self.cfg_scale, self.seed = steps, spacing, cfg_scale, seed
        self.batch_size, self.shards, self.max_ref_images = batch_size, shards, max_ref_images
        self.kid_subsets, self.kid_subset_size, self.clip_model = kid_subsets, kid_subset_size, clip_model
        self.use_ema, self.background = use_ema, parse_background(alpha_background)
        self.last_step = -1
        self.state: dict[str, Any] | None = None  # extractor, CLIP, prompts, reference: built at first use

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Fail before training, not at the first evaluation, on a sampler that does not fit the schedule."""
        check_sampler(self.sampler, pl_module.denoiser.schedule)
        sampling_sigmas(pl_module.denoiser.schedule, self.steps, spacing=self.spacing)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.last_step = trainer.global_step  # after a resume has restored it

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if step == self.last_step:
            return  # gradient accumulation: no optimizer step in this batch
        self.last_step = step
        periodic = self.every_n_steps > 0 and step % self.every_n_steps == 0
        if periodic or (self.at_end and GracefulStop.is_final_step(trainer)):
            self.evaluate(trainer, pl_module)

    # ---------------------------------------------------------------- one evaluation
    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any] | None:
        """``measure``, then every rank logs the same numbers (so a monitor sees them on each rank)."""
        result = self.measure(trainer, pl_module)
        if result is None:
            return None
        for key in ("fid", "kid", "kid_std", "clip_score"):
            if result.get(key) is not None:
                pl_module.log(f"eval/{key}", float(result[key]), rank_zero_only=False)
        return result

    def measure(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any] | None:
        """(every rank takes part) The scores, on every rank: the same numbers as one process computes.

        Batch k of the K images (the same seeds and prompts on any number of ranks) is sampled on rank
        k mod world size, with the EMA weights: under FSDP each rank puts its EMA slices in its weight shards
        and the whole module is gathered (``full_params``, a collective) around the sampling. Rank 0 gathers
        the features in batch order, computes (or reads) the reference statistics, scores and broadcasts.
        """
        if pl_module.autoencoder is None:
            if trainer.is_global_zero:
                log.warning("sample quality: the model has no autoencoder to decode samples; skipped")
            return None
        start = time.perf_counter()
        captions, extractor, clip = self._prepare(trainer, pl_module)
        ema = next((c for c in trainer.callbacks if isinstance(c, EMA)), None)
        swap = ema.swapped_in(pl_module) if (self.use_ema and ema is not None) else nullcontext()
        was_training = pl_module.training
        pl_module.eval()
        ref = None
        with swap, full_params(trainer):
            share = self._sample_share(trainer, pl_module, captions, extractor, clip)
            if trainer.is_global_zero:  # decodes the reference latents: the whole autoencoder is needed
                ref = self._reference(trainer, pl_module, extractor)
        pl_module.train(was_training)
        shares = [share]
        if trainer.world_size > 1:
            shares = [None] * trainer.world_size
            torch.distributed.all_gather_object(shares, share)
        result = None
        if trainer.is_global_zero:
            batches = sorted((b for s in shares for b in s), key=lambda b: b[0])  # (first, features, clip)
            features = torch.cat([b[1] for b in batches])  # (K, D), in seed order
            clip_scores = [b[2] for b in batches if b[2] is not None]
            score = score_features(
                features, ref, self.kid_subsets, self.kid_subset_size, self.seed, clip_scores
            )
            result = self._record(trainer, score, ema is not None, start)
        if trainer.world_size > 1:
            result = trainer.strategy.broadcast(result, src=0)
        return result

    @torch.no_grad()
    def _sample_share(
        self, trainer: L.Trainer, pl_module: L.LightningModule, captions: list[str], extractor: Any, clip: Any
    ) -> list[tuple[int, torch.Tensor, torch.Tensor | None]]:
        """This rank's batches (k = rank, rank + world size, ...): (first index, features (B, D), CLIP
        scores (B,) or None) each, on the CPU."""
        sigmas = sampling_sigmas(pl_module.denoiser.schedule, self.steps, spacing=self.spacing)
        shape = latent_shape(pl_module.net, pl_module.autoencoder, self.image_size)
        pixel_size = [d * pl_module.autoencoder.downsample_factor for d in shape[1:]]  # [H, W]
        firsts = range(0, self.num_samples, self.batch_size)[trainer.global_rank :: trainer.world_size]
        share = []
        for first in firsts:
            seeds = list(range(self.seed + first, self.seed + min(first + self.batch_size, self.num_samples)))
            prompts = [captions[(s - self.seed) % len(captions)] for s in seeds]
            images = generate(
                pl_module.denoiser,
                pl_module.conditioner,
                pl_module.decode_samples,
                sampling_inputs(pl_module.conditioner, prompts, None, pixel_size),
                sampler=self.sampler,
                sigmas=sigmas,
                latent_shape=shape,
                seeds=seeds,
                cfg_scale=self.cfg_scale,
            )  # (B, 3, H, W) in [0, 1]
            scores = clip(images, prompts).cpu() if clip is not None else None
            share.append((first, extractor(images).float().cpu(), scores))
        return share

    def _record(
        self, trainer: L.Trainer, result: dict[str, Any], has_ema: bool, start: float
    ) -> dict[str, Any]:
        """The scores with their settings, logged and appended to ``eval_during_training.jsonl`` (rank 0)."""
        result.update(
            step=trainer.global_step,
            extractor=self.extractor_name,
            steps=self.steps,
            sampler=getattr(self.sampler, "func", self.sampler).__name__,
            cfg_scale=self.cfg_scale,
            seed=self.seed,
            use_ema=self.use_ema and has_ema,
            seconds=round(time.perf_counter() - start, 1),
        )
        log.info(
            "sample quality at step %d: FID %.2f, KID %.4f (n=%d vs %d reference images, %.0f s)",
            result["step"],
            result["fid"],
            result["kid"],
            result["n"],
            result["ref_n"],
            result["seconds"],
        )
        path = Path(trainer.default_root_dir) / "eval_during_training.jsonl"
        with path.open("a") as f:
            f.write(json.dumps(result) + "\n")
        return result

    def _prepare(self, trainer: L.Trainer, pl_module: L.LightningModule) -> tuple[list[str], Any, Any]:
        """The captions, feature extractor and CLIP scorer (every rank), built at the first evaluation."""
        if self.state is None:
            urls = (
                expand_urls(self.shards) if self.shards else list(getattr(trainer.datamodule, "val_urls", []))
            )
            if not urls:
                raise ValueError(
                    "callbacks.sample_quality needs validation shards: set data.val_shards or "
                    "callbacks.sample_quality.shards, or callbacks.sample_quality=null"
                )
            device = pl_module.device
            self.state = {
                "urls": urls,
                "captions": shard_captions(urls, self.max_ref_images),
                "extractor": build_extractor(self.extractor_name, device),
                "clip": ClipScorer(self.clip_model, device) if self.clip_model else None,
                "ref": None,
            }
        return self.state["captions"], self.state["extractor"], self.state["clip"]

    def _reference(self, trainer: L.Trainer, pl_module: L.LightningModule, extractor: Any) -> Any:
        """The reference statistics (rank 0): read from the cache, else computed from the decoded shards."""
        if self.state["ref"] is None:
            urls, device = self.state["urls"], pl_module.device
            kind = shard_kind(urls, "validation shards")
            identity = reference_identity(
                urls,
                self.max_ref_images,
                kind,
                self.image_size,
                pl_module.autoencoder.identity,
                self.background,
            )
            batches = reference_batches(
                urls,
                kind,
                self.image_size,
                self.max_ref_images,
                self.batch_size,
                self.background,
                lambda z: pl_module.autoencoder.decode(z.to(device)),
            )
            path = self._cache_path(urls, identity, trainer)
            self.state["ref"] = load_or_compute(path, identity, extractor, batches)
        return self.state["ref"]

    def _cache_path(self, urls: list[str], identity: dict[str, Any], trainer: L.Trainer) -> Path:
        """Beside the (local, writable) shards so that every run on them shares it; else in the run
        directory."""
        key = hashlib.sha1(json.dumps([identity, self.extractor_name], sort_keys=True).encode()).hexdigest()[
            :12
        ]
        folder = Path(urls[0]).parent
        if "://" in urls[0] or urls[0].startswith("pipe:") or not os.access(folder, os.W_OK):
            folder = Path(trainer.default_root_dir)
        return folder / f"ref_stats_{key}.npz"
