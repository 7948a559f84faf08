"""Test callbacks that break a run on purpose: a signal or an exception at a chosen step, a poisoned
gradient."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch


class InterruptAt(L.Callback):
    """At the start of the batch that trains step ``step + 1`` (after it was fetched), send ``action`` (a
    signal name) to this process, or raise a RuntimeError (``action=exception``): the stop arrives mid-step.
    ``rank``: only on that rank (None: every rank)."""

    def __init__(self, step: int, action: str, rank: int | None = None) -> None:
        self.step = step
        self.action = action
        self.rank = rank

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int
    ) -> None:
        if trainer.global_step != self.step or self.rank not in (None, trainer.global_rank):
            return
        if self.action == "exception":
            raise RuntimeError(f"test failure while training step {self.step + 1}")
        os.kill(os.getpid(), signal.Signals[self.action])


class MarkAndPace(L.Callback):
    """Writes ``marker`` once training reaches ``step`` and sleeps ``pause`` s per batch, so that a test can
    send a signal from outside while the run is training."""

    def __init__(self, marker: str, step: int = 2, pause: float = 0.2) -> None:
        self.marker = Path(marker)
        self.step = step
        self.pause = pause

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if trainer.global_step >= self.step and not self.marker.exists():
            self.marker.write_text(str(os.getpid()))
        time.sleep(self.pause)


class PoisonGradient(L.Callback):
    """Sets one gradient element to NaN after the backward pass (and DDP's all-reduce) of step ``step``
    (0-based optimizer step), on ``rank`` only (None: every rank)."""

    def __init__(self, step: int, rank: int | None = None) -> None:
        self.step = step
        self.rank = rank

    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step == self.step and self.rank in (None, trainer.global_rank):
            param = next(p for p in pl_module.parameters() if p.grad is not None)
            with torch.no_grad():
                param.grad.view(-1)[0] = float("nan")
