"""``hydra/sweeper=ldm_optuna``: the sweeper's config keys (see ``configs/hparams_search/emoji_optuna.yaml``).

Importing this module registers the config; it imports nothing from Optuna, so Hydra's plugin scan stays cheap
and works without the ``sweep`` extra installed. No ``from __future__ import annotations`` here: Hydra's
plugin scan executes this module outside ``sys.modules``, where dataclasses cannot resolve string annotations.
"""

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional  # noqa: UP035 (OmegaConf reads the typing form on every Python we support)

from hydra.core.config_store import ConfigStore


@dataclass
class LdmOptunaSweeperConf:
    _target_: str = "hydra_plugins.ldm_optuna_sweeper.sweeper.LdmOptunaSweeper"
    # the study: trials live in `storage` (an SQLAlchemy URL: sqlite:///path.db, postgresql://...) under
    # `study_name`; a sweep started again with the same two continues the study (finished trials are kept)
    study_name: str = "${..job.name}"  # relative interpolations resolve wherever the hydra node is read
    # null: sqlite:///<hydra.sweep.dir>/optuna.db (computed by the sweeper: Hydra resolves this node before
    # ${hydra:...} works, so an interpolation of paths.* here would fail); jobs get it as LDM_OPTUNA_STORAGE
    storage: Optional[str] = None  # noqa: UP045
    direction: str = "minimize"  # minimize | maximize the value train.py returns (optimized_metric)
    n_trials: int = 20  # trials to finish in this study, counting those already in the storage
    n_jobs: int = 1  # trials per batch handed to the launcher (parallel with joblib / submitit launchers)
    # any optuna.samplers / optuna.pruners class; pruner: null never prunes
    sampler: Any = field(default_factory=lambda: {"_target_": "optuna.samplers.TPESampler", "seed": None})
    pruner: Any = field(
        default_factory=lambda: {
            "_target_": "optuna.pruners.MedianPruner",
            "n_startup_trials": 3,
            "n_warmup_steps": 0,
        }
    )
    # the search space in Hydra's sweep grammar, e.g. {optim.lr: "tag(log, interval(1e-4, 3e-3))"}; sweep
    # overrides on the command line join it, plain overrides are passed to every trial
    params: Dict[str, str] = field(default_factory=dict)  # noqa: UP006
    # trials to run first when the study is new, e.g. the current default as the baseline: {param: value} each
    enqueue: List[Dict[str, Any]] = field(default_factory=list)  # noqa: UP006
    # trials killed with the sweep run again when it restarts: same params, from their newest checkpoint if
    # any
    retry_interrupted: bool = True
    max_consecutive_failures: int = 3  # stop the sweep after this many trials in a row raised an error


ConfigStore.instance().store(
    group="hydra/sweeper", name="ldm_optuna", node=LdmOptunaSweeperConf, provider="ldm_optuna_sweeper"
)
