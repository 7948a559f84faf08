"""What train.py records about a run: the callback order that makes a step saveable, how the run ended, and
the summary.json it writes however it ends."""

from __future__ import annotations

import resource
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig

from ldm.cli import one_line
from ldm.lit.ema import EMA
from ldm.lit.guards import NonFiniteError
from ldm.lit.preemption import GracefulStop, TrainingInterrupted


def order_callbacks(callbacks: list[Any]) -> list[Any]:
    """GracefulStop right after the EMA: a step is complete (and may be saved) once the EMA has blended it."""
    stops = [c for c in callbacks if isinstance(c, GracefulStop)]
    rest = [c for c in callbacks if not isinstance(c, GracefulStop)]
    last_ema = max((i for i, c in enumerate(rest) if isinstance(c, EMA)), default=-1)
    return rest[: last_ema + 1] + stops + rest[last_ema + 1 :]


def command_line_overrides() -> list[str]:
    try:
        return list(HydraConfig.get().overrides.task)
    except ValueError:  # composed without @hydra.main (tests, notebooks)
        return []


def status_of(error: BaseException | None) -> str:
    if error is None:
        return "finished"
    if type(error).__name__ == "TrialPruned":  # optuna's, raised by ldm.lit.optuna_pruning in a sweep
        return "pruned"
    if isinstance(error, TrainingInterrupted):
        return "interrupted"
    return "diverged" if isinstance(error, NonFiniteError) else "failed"


def run_summary(
    trainer: L.Trainer, output_dir: Path, error: BaseException | None, resume: Path | None, wall: float
) -> dict[str, Any]:
    """summary.json: how the run ended (status, error), where it resumed from, steps, wall time, memory,
    metrics."""
    return {
        "output_dir": str(output_dir),
        "status": status_of(error),
        "interrupted": isinstance(error, TrainingInterrupted),
        "error": one_line(error) if error is not None else None,
        "resumed_from": str(resume) if resume is not None else None,
        "global_step": trainer.global_step,
        "fit_wall_s": round(wall, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "peak_accelerator_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1)
        if torch.cuda.is_available()
        else None,
        "metrics": {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1},
    }
