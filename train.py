"""Train a model: `python train.py [experiment=...] [group=option] [key=value]` (see README and
configs/train.yaml).

Composes the config, instantiates data, model, callbacks, loggers and trainer, then fits. No maths here.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.callbacks import LearningRateMonitor
from omegaconf import DictConfig, OmegaConf

from ldm.cli import exit_on_user_error, one_line
from ldm.config_utils import fill_label_vocabulary
from ldm.data.datamodule import ShardDataModule
from ldm.instantiate import build
from ldm.lit.callbacks import ConfigInCheckpoint
from ldm.lit.checkpoint_io import AtomicCheckpointIO
from ldm.lit.guards import NonFiniteError
from ldm.lit.latent_diffusion import LatentDiffusion, check_latent_source
from ldm.lit.preemption import GracefulStop, TrainingInterrupted
from ldm.lit.run_dir import is_launcher_child, prepare_run_dir, register_resolvers
from ldm.lit.run_summary import command_line_overrides, order_callbacks, run_summary
from ldm.reconstruction import reconstruction_check

log = logging.getLogger("train")
register_resolvers()  # ${ldm_run_id:} in configs/hydra/default.yaml

EXIT_DIVERGED = 3


def build_list(node: DictConfig | None) -> list[Any]:
    """Instantiate every entry of a group that holds several named objects (callbacks, loggers)."""
    if not node:
        return []
    return [build(v) for v in node.values() if v is not None and "_target_" in v]


def configure_backends(trainer: L.Trainer, tf32: bool) -> None:
    """Process-wide torch settings that depend on where the trainer runs."""
    on_cpu = isinstance(trainer.accelerator, CPUAccelerator)
    if not on_cpu and tf32:
        # float32 matmuls on tensor cores (TF32; cuDNN's convolutions already use it): the fp32 parts of a
        # bf16-mixed step (the fp32 VAE, the optimizer's fp32 master math) and 32-true runs. Not on the CPU,
        # where "high" may switch oneDNN to bf16 arithmetic.
        torch.set_float32_matmul_precision("high")
    if on_cpu and trainer.num_devices > 1:
        # several CPU processes on one machine: share the cores instead of oversubscribing them (2 x 2 threads
        # on 2 cores runs ~10x slower than 2 x 1)
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // trainer.num_devices))


def run(cfg: DictConfig) -> dict[str, Any]:
    """Fit, and write ``summary.json`` however the fit ends (finished, interrupted, diverged, failed).

    Re-raises what stopped an unfinished run (``TrainingInterrupted``, ``NonFiniteError``, ...) after the
    summary.
    """
    L.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)
    resume = prepare_run_dir(
        output_dir, cfg.get("ckpt_path"), Path(cfg.paths.log_dir) / cfg.task_name / "runs"
    )
    resolved = OmegaConf.to_container(cfg, resolve=True)
    output_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.create(resolved), output_dir / "config_resolved.yaml")

    datamodule = build(cfg.data)
    labels = (getattr(datamodule, "index_meta", None) or {}).get("labels")
    if cfg.get("conditioner") is not None and fill_label_vocabulary(cfg.conditioner, labels):
        # the label names go into the stored config, so sample.py label=<name> needs no data
        resolved = OmegaConf.to_container(cfg, resolve=True)
        OmegaConf.save(OmegaConf.create(resolved), output_dir / "config_resolved.yaml")
    model = build(cfg.model)
    if isinstance(model, LatentDiffusion):
        check_latent_source(datamodule.index_meta, model.autoencoder, model.conditioner)
        images = isinstance(datamodule, ShardDataModule) and datamodule.kind == "images"
        if (
            images
            and model.autoencoder is not None
            and cfg.get("check_autoencoder", 0)
            and not is_launcher_child()
        ):
            reconstruction_check(
                datamodule.train_urls,
                model.autoencoder,
                int(cfg.image_size),
                int(cfg.check_autoencoder),
                background=datamodule.alpha_background,
            )
    callbacks = order_callbacks(build_list(cfg.get("callbacks")) + [ConfigInCheckpoint(resolved)])
    loggers = build_list(cfg.get("logger"))
    if not loggers:  # LearningRateMonitor refuses to run without a logger
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    trainer: L.Trainer = build(
        cfg.trainer, callbacks=callbacks, logger=loggers or False, plugins=[AtomicCheckpointIO()]
    )
    for (
        logger
    ) in trainer.loggers:  # the whole config (and the overrides) beside the metrics; none in fast_dev_run
        logger.log_hyperparams({"overrides": command_line_overrides(), **resolved})

    configure_backends(trainer, bool(cfg.get("tf32", True)))
    start = time.perf_counter()
    error: BaseException | None = None
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=str(resume) if resume is not None else None)
    except BaseException as exc:  # the summary records every ending; the exception is raised again below
        error = exc
    wall = time.perf_counter() - start
    stop = next((c for c in callbacks if isinstance(c, GracefulStop)), None)
    saved_in_loop = stop is not None and stop.final_step_saved == trainer.global_step
    if error is None and not trainer.interrupted and not trainer.fast_dev_run and not saved_in_loop:
        # the end state (max_time, or no GracefulStop callback): resumable, with EMA weights and config
        try:
            trainer.save_checkpoint(output_dir / "checkpoints" / "last.ckpt")
        except Exception as exc:  # a full disk, non-finite weights: still recorded in summary.json below
            error = exc
    summary = run_summary(trainer, output_dir, error, resume, wall)
    if trainer.is_global_zero:
        (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        log.info("run summary: %s", json.dumps(summary))
    if error is not None:
        raise error
    return summary


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
@exit_on_user_error
def main(cfg: DictConfig) -> float | None:
    """Exit codes: 0 finished, 2 bad input (one line), 3 diverged, 128 + N stopped by signal N (143 SIGTERM).

    Returns the final value of ``optimized_metric`` for sweepers (NaN when it was not logged); under ``-m`` a
    diverged job returns NaN instead of exiting, so the sweep goes on.
    """
    try:
        summary = run(cfg)
    except TrainingInterrupted as stop:
        log.warning("%s", stop)
        sys.exit(stop.exit_code)
    except NonFiniteError as exc:
        log.error("%s", one_line(exc))
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            return float("nan")
        sys.exit(EXIT_DIVERGED)
    name = cfg.get("optimized_metric")
    if name is not None and name not in summary["metrics"]:
        log.warning(
            "optimized_metric=%s was not logged (logged: %s): returning NaN", name, sorted(summary["metrics"])
        )
    return summary["metrics"].get(name, float("nan")) if name is not None else None


if __name__ == "__main__":
    main()
