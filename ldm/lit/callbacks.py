"""Training callbacks: sample grids for fixed prompts, throughput, RNG state, the resolved config in
checkpoints."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger

from ldm.conditioning.labels import ClassConditioner
from ldm.conditioning.multi import as_multi, sampling_inputs
from ldm.data.buckets import most_common_bucket
from ldm.generate import generate, latent_shape, make_grid, to_pil
from ldm.lit.ema import EMA
from ldm.lit.sharded import fsdp_root, full_params
from ldm.sampling.grids import sampling_sigmas
from ldm.sampling.registry import check_sampler

log = logging.getLogger(__name__)


class SampleGrid(L.Callback):
    """Every ``every_n_steps`` (and at the end of training) sample a grid for fixed prompts with the EMA
    weights.

    The grid is written to ``<run dir>/samples/step_XXXXXX.png`` and sent to the wandb / TensorBoard loggers.
    ``image_size``: a side (square), [H, W], or "auto": the aspect-ratio bucket holding most samples in the
    training shards' index (``bucket_counts``, see ``ldm.data.buckets``), else their square ``image_size``.

    A model with a class-label conditioner gets a grid by label: image i shows class i (the first
    ``max_labels`` classes, named in the loggers' caption), with prompt i when it also reads captions;
    size-conditioned models are asked for the grid's own size, uncropped.
    """

    def __init__(
        self,
        prompts: Sequence[str],
        image_size: int | Sequence[int] | str,
        sampler: Callable[..., torch.Tensor],
        steps: int = 25,
        spacing: str | None = None,
        cfg_scale: float = 5.0,
        guidance_rescale: float = 0.0,
        guidance_interval: Sequence[float] | None = None,
        seed: int = 0,
        every_n_steps: int = 500,
        out_dir: str = "samples",
        use_ema: bool = True,
        max_labels: int = 16,
    ) -> None:
        self.prompts = list(prompts)
        self.max_labels = max_labels
        self.image_size = image_size if isinstance(image_size, int | str) else [int(n) for n in image_size]
        self.size: tuple[int, int] | None = None if image_size == "auto" else grid_size(image_size, {})
        self.sampler = sampler
        self.steps = steps
        self.spacing = spacing
        self.cfg_scale = cfg_scale
        self.guidance_rescale = guidance_rescale
        self.guidance_interval = list(guidance_interval) if guidance_interval is not None else None
        self.seed = seed
        self.every_n_steps = every_n_steps
        self.out_dir = Path(out_dir)
        self.use_ema = use_ema
        self.last_path: Path | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Fail before training, not at the first grid, when the sampler or spacing does not fit the
        schedule."""
        check_sampler(self.sampler, pl_module.denoiser.schedule)
        sampling_sigmas(pl_module.denoiser.schedule, self.steps, spacing=self.spacing)
        if self.size is None:
            self.size = grid_size(self.image_size, getattr(trainer.datamodule, "index_meta", None) or {})
            log.info("sample grid at %dx%d px (image_size=auto)", *self.size)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if self.every_n_steps > 0 and step % self.every_n_steps == 0:
            self.sample(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.sample(trainer, pl_module)

    def sample(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Rank 0 samples and writes the grid. Under FSDP every rank takes part: each puts its EMA slices in
        its weight shards and the whole module is gathered (``full_params``) while rank 0 samples."""
        if pl_module.autoencoder is None:
            return
        sharded = fsdp_root(trainer) is not None
        if not sharded and not trainer.is_global_zero:
            return
        if self.size is None:
            self.size = grid_size(self.image_size, getattr(trainer.datamodule, "index_meta", None) or {})
        ema = next((c for c in trainer.callbacks if isinstance(c, EMA)), None)
        swap = ema.swapped_in(pl_module) if (self.use_ema and ema is not None) else nullcontext()
        was_training = pl_module.training
        pl_module.eval()
        images = None
        prompts, labels, captions = self.grid_inputs(pl_module.conditioner)
        n = len(captions)
        with swap, full_params(trainer):
            if trainer.is_global_zero:
                images = generate(
                    pl_module.denoiser,
                    pl_module.conditioner,
                    pl_module.decode_samples,
                    sampling_inputs(pl_module.conditioner, prompts, labels, self.size),
                    sampler=self.sampler,
                    sigmas=sampling_sigmas(pl_module.denoiser.schedule, self.steps, spacing=self.spacing),
                    latent_shape=latent_shape(pl_module.net, pl_module.autoencoder, self.size),
                    seeds=[self.seed + i for i in range(n)],
                    cfg_scale=self.cfg_scale,
                    guidance_rescale=self.guidance_rescale,
                    guidance_interval=self.guidance_interval,
                )
        pl_module.train(was_training)
        if images is None:
            return
        grid = make_grid(to_pil(images), ncols=min(8, n))
        path = self.out_dir / f"step_{trainer.global_step:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        grid.save(path)
        self.last_path = path
        log.info("sample grid written to %s", path)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(
                    "samples",
                    [str(path)],
                    step=trainer.global_step,
                    caption=[" | ".join(captions)],
                )
            elif isinstance(logger, TensorBoardLogger):
                arr = np.asarray(grid).transpose(2, 0, 1)  # (3, H, W) uint8
                logger.experiment.add_image("samples", arr, global_step=trainer.global_step)
            elif isinstance(logger, CSVLogger):
                pass  # the PNG in the run directory is the record

    def grid_inputs(
        self, conditioner: torch.nn.Module
    ) -> tuple[list[str] | None, list[int] | None, list[str]]:
        """(prompts, label ids, one caption per image): the fixed prompts, or a grid by label for label
        models."""
        found = as_multi(conditioner).find(ClassConditioner)
        if found is None:
            return self.prompts, None, [str(p) for p in self.prompts]
        ids = list(range(min(found.num_classes, self.max_labels)))
        names = [found.labels[i] if found.labels is not None else str(i) for i in ids]
        if len(as_multi(conditioner).conditioners) == 1:  # labels only
            return None, ids, names
        prompts = [self.prompts[i % len(self.prompts)] if self.prompts else "" for i in ids]
        return prompts, ids, [f"{p} [{name}]" for p, name in zip(prompts, names, strict=True)]


def grid_size(image_size: int | Sequence[int] | str, index_meta: dict[str, Any]) -> tuple[int, int]:
    """(H, W) of the sample grid's images: a side, [H, W], or "auto" from the training shards' index meta."""
    if image_size == "auto":
        bucket = most_common_bucket(index_meta)
        side = index_meta.get("image_size")
        if bucket is None and side is None:
            raise ValueError(
                "callbacks.sample_grid.image_size=auto found no bucket_counts or image_size in the training "
                "shards' index: set it to a side or [H, W], e.g. callbacks.sample_grid.image_size=[192,320]"
            )
        return bucket if bucket is not None else (int(side), int(side))
    if isinstance(image_size, str):
        raise ValueError(f"sample grid image_size='{image_size}': give a side, [H, W] or auto")
    if isinstance(image_size, int):
        return (image_size, image_size)
    sides = [int(n) for n in image_size]
    if len(sides) != 2:
        raise ValueError(f"sample grid image_size={sides}: give a side, [H, W] or auto")
    return (sides[0], sides[1])


class Throughput(L.Callback):
    """Logs training samples/s (per rank, times world size) averaged over ``window`` steps."""

    def __init__(self, window: int = 20) -> None:
        self.window = window
        self.t0: float | None = None
        self.samples = 0

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.t0 is None:
            self.t0 = time.perf_counter()
            self.samples = 0

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        key = "latent" if "latent" in batch else "image"
        self.samples += int(batch[key].shape[0])
        if trainer.global_step % self.window == 0 and self.t0 is not None:
            elapsed = time.perf_counter() - self.t0
            rate = self.samples / max(elapsed, 1e-9) * trainer.world_size
            pl_module.log("train/samples_per_sec", rate, prog_bar=True)
            pl_module.log("train/steps_per_sec", self.samples / max(elapsed, 1e-9) / int(batch[key].shape[0]))
            self.t0, self.samples = time.perf_counter(), 0


class RNGState(L.Callback):
    """Saves and restores the global RNG states (torch CPU and accelerator, numpy, python) with the
    checkpoint."""

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        np_state = np.random.get_state()
        checkpoint["rng_states"] = {
            "torch": torch.get_rng_state(),
            "accelerator": _device_module(pl_module).get_rng_state_all() if _device_module(pl_module) else [],
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(float, np_state[2:])],
            "python": _python_state_to_tensor(random.getstate()),
        }

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        states = checkpoint.get("rng_states")
        if states is None:
            log.warning("checkpoint has no RNG state: global random streams will not continue exactly")
            return
        torch.set_rng_state(states["torch"])
        if states["accelerator"] and _device_module(pl_module):
            _device_module(pl_module).set_rng_state_all(states["accelerator"])
        name, keys, pos, has_gauss, gauss = states["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), gauss))
        random.setstate(_python_state_from_tensor(states["python"]))


def _device_module(pl_module: L.LightningModule) -> Any:
    """torch.<device type> of the module's accelerator (for its RNG states), None on the CPU."""
    kind = pl_module.device.type
    return None if kind == "cpu" else torch.get_device_module(kind)


def _python_state_to_tensor(state: tuple) -> dict[str, Any]:
    version, internal, gauss = state
    return {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss": gauss}


def _python_state_from_tensor(state: dict[str, Any]) -> tuple:
    return (state["version"], tuple(int(v) for v in state["internal"].tolist()), state["gauss"])


class ConfigInCheckpoint(L.Callback):
    """Stores the resolved run config (a plain dict) in every checkpoint, so a checkpoint alone can be
    sampled."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        checkpoint["ldm_config"] = self.config
