"""Stopping without losing work: signals end the run at the next optimizer step with a resumable checkpoint,
and an exception saves the last consistent state.

SIGTERM, SIGINT and SIGUSR1 only set a flag; at the end of the next optimizer step (after the EMA update)
every rank agrees on the flag (one all-reduce), the run saves ``last.ckpt`` atomically (weights, EMA,
optimizer, data position, RNG) and raises ``TrainingInterrupted``; ``train.py`` writes ``summary.json`` with
``"interrupted": true`` and exits with 128 + the signal number (143 SIGTERM, 130 SIGINT, 138 SIGUSR1). Under
SLURM the requeue signal also requeues the job (``scontrol requeue``), and the requeued job resumes from that
checkpoint in the same run directory (``ldm.lit.run_dir``). Nothing is saved inside a signal handler, so a
checkpoint never holds half a step.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

log = logging.getLogger(__name__)

SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1")


class TrainingInterrupted(Exception):
    """Training stopped on a signal after saving ``checkpoint``; the process should exit with
    ``exit_code``."""

    def __init__(self, signum: int, checkpoint: Path | None, step: int) -> None:
        self.signum = signum
        self.checkpoint = checkpoint
        self.step = step
        name = signal.Signals(signum).name
        saved = f"saved {checkpoint}" if checkpoint is not None else "no checkpoint saved"
        super().__init__(f"{name} at step {step}: {saved}; resume with ckpt_path=last")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def slurm_job_id() -> str | None:
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array_job is not None:
        return f"{array_job}_{os.environ.get('SLURM_ARRAY_TASK_ID', '0')}"
    return os.environ.get("SLURM_JOB_ID")


class GracefulStop(L.Callback):
    """Signals and exceptions end the run with a consistent checkpoint (see the module docstring).

    ``requeue``: under SLURM, the requeue signal (``requeue_signal``) also requeues the job.
    ``save_on_exception``: an exception during training saves the last consistent state (the weights of the
    last completed step, the data position of the batches in them) unless the exception came after an
    optimizer step whose end-of-step hooks did not finish.
    """

    def __init__(
        self,
        dirpath: str,
        filename: str = "last.ckpt",
        signals: tuple[str, ...] | list[str] = SIGNALS,
        requeue: bool = True,
        requeue_signal: str = "SIGUSR1",
        save_on_exception: bool = True,
    ) -> None:
        unknown = [s for s in signals if s not in signal.Signals.__members__]
        if unknown:
            raise ValueError(
                f"callbacks.graceful_stop.signals: unknown signal(s) {unknown}; e.g. [SIGTERM, SIGINT]"
            )
        self.path = Path(dirpath) / filename
        self.signals = [signal.Signals[s] for s in signals]
        self.requeue = requeue
        self.requeue_signal = signal.Signals[requeue_signal]
        self.save_on_exception = save_on_exception
        self.requested = 0  # the signal number received, 0 for none
        self.received = 0
        self.committed_step = 0  # the last step whose end-of-step hooks (EMA) all ran
        self.final_step_saved: int | None = None  # the step of the end-of-training save, once written
        self.previous: dict[signal.Signals, Any] = {}

    # ---------------------------------------------------------------- signal handlers
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.previous = {s: signal.getsignal(s) for s in self.signals}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Installed after Lightning's own handlers, which save mid-step (SLURM) or exit 0 (SIGTERM)."""
        self.committed_step = trainer.global_step
        if trainer.received_sigterm and signal.SIGTERM in self.signals:  # arrived before these handlers
            self.requested = signal.SIGTERM
        for s in self.signals:
            signal.signal(s, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received += 1
        if self.requested:
            if signum == signal.SIGINT and self.received >= 3:
                raise KeyboardInterrupt  # a third Ctrl+C: stop now (checkpoint writes stay atomic)
            return  # the same stop forwarded by a launcher or sent to the whole process group
        self.requested = signum
        log.warning(
            "received %s: saving a checkpoint at the end of this step, then stopping",
            signal.Signals(signum).name,
        )

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for s, handler in self.previous.items():
            if handler is not None:
                signal.signal(s, handler)
        self.previous = {}

    # ---------------------------------------------------------------- the step boundary
    def _agreed_signal(self, trainer: L.Trainer, pl_module: L.LightningModule) -> int:
        """The largest signal number requested on any rank (0: none); one all-reduce when distributed."""
        if trainer.world_size > 1 and torch.distributed.is_initialized():
            flag = torch.tensor([self.requested], device=pl_module.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            return int(flag.item())
        return self.requested

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step == self.committed_step:
            return  # gradient accumulation: no optimizer step in this batch
        self.committed_step = trainer.global_step
        signum = self._agreed_signal(trainer, pl_module)
        if not signum:
            if self.is_final_step(trainer) and not trainer.fast_dev_run:
                # saved here, inside the loop: a save after fit() records a mid-epoch stop as a finished
                # epoch, and a run continued with a larger max_steps would then skip the rest of that epoch's
                # data
                trainer.save_checkpoint(self.path)
                self.final_step_saved = trainer.global_step
            return
        trainer.save_checkpoint(self.path)
        log.warning("%s: saved %s at step %d", signal.Signals(signum).name, self.path, trainer.global_step)
        if (
            signum == self.requeue_signal
            and self.requeue
            and SLURMEnvironment.detect()
            and trainer.is_global_zero
        ):
            requeue_slurm_job()
        raise TrainingInterrupted(signum, self.path, trainer.global_step)

    @staticmethod
    def is_final_step(trainer: L.Trainer) -> bool:
        """The last optimizer step of the run (max_steps, or the last batch of the last of max_epochs)."""
        if trainer.max_steps not in (None, -1) and trainer.global_step >= trainer.max_steps:
            return True
        last_epoch = trainer.max_epochs not in (None, -1) and trainer.current_epoch + 1 >= trainer.max_epochs
        return bool(last_epoch and trainer.fit_loop.epoch_loop.batch_progress.is_last_batch)

    # ---------------------------------------------------------------- exceptions
    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        if not self.save_on_exception or isinstance(exception, TrainingInterrupted | KeyboardInterrupt):
            return
        if trainer.global_step == 0:
            return  # nothing trained yet (non-finite weights are refused by the checkpoint writer)
        if not isinstance(trainer.strategy, SingleDeviceStrategy | DDPStrategy):
            log.warning(
                "not saving on %s under %s: gathering sharded weights needs every rank",
                type(exception).__name__,
                type(trainer.strategy).__name__,
            )
            return
        if trainer.global_step != self.committed_step:
            log.warning(
                "not saving on %s: it came after the optimizer step of step %d but before that step's "
                "end-of-step hooks (EMA) finished; the last periodic checkpoint is the newest consistent "
                "state",
                type(exception).__name__,
                trainer.global_step,
            )
            return
        try:
            # this rank only, without the barrier of trainer.save_checkpoint: the other ranks may be stuck in
            # a collective; DDP replicas hold the same weights, so any failing rank's copy is the run's state
            checkpoint = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
            trainer.strategy.checkpoint_io.save_checkpoint(checkpoint, self.path)
        except Exception as save_error:  # the original exception is the one to report
            log.error("could not save a checkpoint after %s: %s", type(exception).__name__, save_error)
            return
        log.warning(
            "%s during step %d: saved %s (the last completed step); resume with ckpt_path=last",
            type(exception).__name__,
            trainer.global_step,
            self.path,
        )


def requeue_slurm_job() -> None:
    """``scontrol requeue`` this job: SLURM restarts it, and it resumes from the checkpoint just saved."""
    job = slurm_job_id()
    if job is None:
        log.warning("SLURM requeue signal outside a SLURM job: not requeued")
        return
    try:
        done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.error("could not requeue SLURM job %s: %s", job, exc)
        return
    if done.returncode == 0:
        log.warning("requeued SLURM job %s", job)
    else:
        log.error("scontrol requeue %s failed (%d): %s", job, done.returncode, done.stderr.strip())
