"""Checkpoint time against fit time for the default run (goal: at most 1% of wall time).

Trains the default model on the default data (the built-in emoji latent shards) with the default EMA, saving a
full checkpoint (weights, EMA, optimizer, data position, RNG, the resolved config) every ``--every`` steps,
and times each training step and each ``trainer.save_checkpoint`` in the same run (interleaved by
construction). The default run's share is then (saves in the default run) x (median save) / (default steps x
median step + that), with the saves the default callbacks make in 420 steps: the periodic one (every 400), the
best-by-val-loss one after each validation (every 2 epochs of 58 batches: 3), and last.ckpt at the end: 5.

    python bench/checkpoint_share.py [--steps 24] [--every 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from ldm.config_utils import compose_config
from ldm.lit.callbacks import ConfigInCheckpoint, RNGState

DEFAULT_STEPS, DEFAULT_SAVES = 420, 5


class Timer(L.Callback):
    def __init__(self, every: int, folder: Path) -> None:
        self.every, self.folder = every, folder
        self.steps: list[float] = []
        self.saves: list[float] = []
        self.sizes: list[int] = []
        self.t0 = 0.0

    def on_train_batch_start(self, trainer: L.Trainer, *args: object) -> None:
        self.t0 = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        self.steps.append(
            time.perf_counter() - self.t0
        )  # forward, backward, optimizer, EMA (earlier callback)
        if trainer.global_step % self.every == 0:
            path = self.folder / f"step_{trainer.global_step}.ckpt"
            start = time.perf_counter()
            trainer.save_checkpoint(path)
            self.saves.append(time.perf_counter() - start)
            self.sizes.append(path.stat().st_size)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--every", type=int, default=3)
    args = parser.parse_args()
    cfg = compose_config("train", [])
    model = instantiate(cfg.model)
    data = instantiate(cfg.data)
    with tempfile.TemporaryDirectory() as tmp:
        timer = Timer(args.every, Path(tmp))
        callbacks = [
            instantiate(cfg.callbacks.ema),
            RNGState(),
            ConfigInCheckpoint(OmegaConf.to_container(cfg)),
            timer,
        ]
        trainer = L.Trainer(
            accelerator="cpu",
            devices=1,
            max_steps=args.steps,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
            gradient_clip_val=cfg.trainer.gradient_clip_val,
            callbacks=callbacks,
            default_root_dir=tmp,
        )
        trainer.fit(model, datamodule=data)
    steps, saves = timer.steps[1:], timer.saves  # the first step warms up
    step, save = statistics.median(steps), statistics.median(saves)
    share = DEFAULT_SAVES * save / (DEFAULT_STEPS * step + DEFAULT_SAVES * save)
    print(
        f"\ncheckpoint vs training step, default config, {args.steps} steps, a save every {args.every}; "
        f"{torch.get_num_threads()} threads, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}"
    )
    print("| measure | median | min-max |")
    print("| ------- | ------ | ------- |")
    print(f"| training step (ms) | {step * 1e3:.0f} | {min(steps) * 1e3:.0f}-{max(steps) * 1e3:.0f} |")
    print(f"| save_checkpoint (ms) | {save * 1e3:.0f} | {min(saves) * 1e3:.0f}-{max(saves) * 1e3:.0f} |")
    print(f"| checkpoint size (MB) | {statistics.median(timer.sizes) / 2**20:.1f} | |")
    print(
        f"| save / step | {save / step:.2f} | {min(saves) / max(steps):.2f}-{max(saves) / min(steps):.2f} |"
    )
    print(
        f"\ndefault run: {DEFAULT_SAVES} saves in {DEFAULT_STEPS} steps -> checkpoint share of fit time "
        f"{100 * share:.2f}% (goal <= 1%)"
    )


if __name__ == "__main__":
    main()
