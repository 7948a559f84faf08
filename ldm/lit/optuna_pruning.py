"""Intermediate values for Optuna: report a metric after each validation, stop the run when the pruner says
so.

Active only in a job of the ``ldm_optuna`` sweeper (``hydra/sweeper=ldm_optuna``, see
``configs/hparams_search/``): the sweeper tells each job its trial number (``LDM_OPTUNA_TRIAL``), and the
config passes the study's storage, name and pruner. Rank 0 reports to the storage and asks the pruner; every
rank gets the decision, and all raise ``optuna.TrialPruned`` together. The run then ends like an exception
does (``last.ckpt`` of the last completed step, ``summary.json`` with the error ``TrialPruned: ...``), and the
sweeper records the trial as pruned. Outside a sweep (no trial number) the callback does nothing.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import lightning as L

from ldm.cli import UserError

log = logging.getLogger(__name__)


class OptunaPruning(L.Callback):
    """``monitor``: the metric reported (train.py's ``optimized_metric``); ``trial``: the trial number or
    None."""

    def __init__(
        self,
        monitor: str,
        storage: str | None = None,
        study_name: str | None = None,
        trial: int | str | None = None,
        pruner: Any = None,
    ) -> None:
        self.monitor = monitor
        self.storage = storage
        self.study_name = study_name
        self.trial_number = int(trial) if trial not in (None, "") else None
        self.pruner = pruner
        self.trial: Any = None  # optuna.trial.Trial on rank 0 while fitting
        if self.trial_number is not None and (storage is None or study_name is None):
            raise ValueError(
                f"callbacks.optuna_pruning: trial {self.trial_number} needs storage and study_name (set by "
                "hparams_search configs from hydra.sweeper)"
            )

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.trial_number is None or stage != "fit" or not trainer.is_global_zero:
            return
        self.trial = open_trial(self.storage, self.study_name, self.trial_number, self.pruner)
        log.info(
            "Optuna trial %d of study '%s': reporting %s after each validation",
            self.trial_number,
            self.study_name,
            self.monitor,
        )

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.trial_number is None or trainer.sanity_checking:
            return
        prune, value = False, math.nan
        if self.trial is not None:
            metric = trainer.callback_metrics.get(self.monitor)
            if metric is None:
                log.warning(
                    "optuna pruning: %s was not logged at this validation; nothing reported", self.monitor
                )
            else:
                value = float(metric)
                self.trial.report(value, step=trainer.global_step)
                prune = bool(self.trial.should_prune())
        if trainer.world_size > 1:
            prune = bool(trainer.strategy.broadcast(prune, src=0))
        if prune:
            import optuna

            raise optuna.TrialPruned(
                f"trial {self.trial_number} pruned at step {trainer.global_step}: {self.monitor}={value:.6g}"
            )

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.trial = None


def open_trial(storage: str | None, study_name: str | None, number: int, pruner: Any) -> Any:
    """The running trial ``number`` of a stored study, with the sweeper's pruner (pruners are not stored)."""
    try:
        import optuna
    except ImportError as exc:
        raise UserError("callbacks.optuna_pruning needs Optuna: pip install -e '.[sweep]'") from exc

    rdb = optuna.storages.RDBStorage(str(storage))
    try:
        trial_id = rdb.get_trial_id_from_study_id_trial_number(
            rdb.get_study_id_from_name(str(study_name)), number
        )
        running = rdb.get_trial(trial_id).state == optuna.trial.TrialState.RUNNING
    except KeyError:
        running = False
    if not running:
        raise ValueError(
            f"Optuna study '{study_name}' has no running trial {number}: LDM_OPTUNA_TRIAL is set by the "
            f"ldm_optuna "
            "sweeper; unset it to train outside a sweep"
        )
    pruner = pruner if pruner is not None else optuna.pruners.NopPruner()
    return optuna.trial.Trial(optuna.load_study(study_name=study_name, storage=rdb, pruner=pruner), trial_id)
