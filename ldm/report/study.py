"""The Optuna study behind a sweep directory (written there by ``hydra/sweeper=ldm_optuna`` as
optuna_study.yaml)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

log = logging.getLogger(__name__)

STUDY_FILE = "optuna_study.yaml"  # the name hydra_plugins.ldm_optuna_sweeper writes


@dataclass
class StudyInfo:
    study: Any  # optuna.Study
    sweep_dir: Path
    metric: str | None
    direction: str
    trials: dict[Path, tuple[int, str]]  # run directory -> (trial number, state)


def find_study(dirs: list[Path]) -> StudyInfo | None:
    """The study of the first of ``dirs`` holding optuna_study.yaml, or None (not an Optuna sweep)."""
    for sweep_dir in dict.fromkeys(dirs):
        info_file = sweep_dir / STUDY_FILE
        if info_file.is_file():
            return load_study(sweep_dir, OmegaConf.to_container(OmegaConf.load(info_file)))  # type: ignore[arg-type]
    return None


def load_study(sweep_dir: Path, info: dict[str, Any]) -> StudyInfo | None:
    try:
        import optuna
    except ImportError:
        log.warning(
            "%s is an Optuna sweep, but Optuna is not installed (pip install -e '.[sweep]'): no study plots",
            sweep_dir,
        )
        return None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.load_study(study_name=info["study_name"], storage=info["storage"])
    except (KeyError, ValueError, RuntimeError) as exc:
        log.warning("cannot load the Optuna study of %s (%s): no study plots", sweep_dir, exc)
        return None
    trials: dict[Path, tuple[int, str]] = {}
    for trial in study.get_trials(deepcopy=False):
        run_dir = trial.user_attrs.get("run_dir") or sweep_dir / str(
            trial.user_attrs.get("job_num", trial.number)
        )
        state = trial.state.name.lower()
        if trial.state.name == "FAIL":
            state = str(trial.user_attrs.get("status", "interrupted"))
        trials[Path(run_dir).resolve()] = (trial.number, state)
    direction = study.direction.name.lower()
    return StudyInfo(study, sweep_dir, info.get("metric"), direction, trials)
