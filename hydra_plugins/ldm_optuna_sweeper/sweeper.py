"""A Hydra sweeper on Optuna's ask/tell API: ``python train.py -m hparams_search=emoji_optuna``.

- **Persistent and resumable.** Trials live in ``storage`` (SQLite in the sweep directory by default) under
  ``study_name``. Started again with the same command, the sweep loads the study, keeps every finished trial
  and runs only the ``n_trials`` still missing. Trials that were running when the sweep was killed are marked
  failed and, with ``retry_interrupted``, enqueued again with the same parameters, resuming from the newest
  complete checkpoint of their run directory (``ckpt_path=...``) when they saved one. One sweeper process per
  study.
- **Pruning.** Each job learns its trial number from ``LDM_OPTUNA_TRIAL`` (set through ``hydra.job.env_set``,
  so it reaches local, joblib and SLURM jobs alike); the training callback
  ``ldm.lit.optuna_pruning.OptunaPruning`` reports the monitored metric after each validation to the shared
  storage and raises ``optuna.TrialPruned`` when the pruner says so.
- **Failures do not stop the sweep.** A diverged job (train.py returns NaN under ``-m``) and a job that raised
  are told as failed trials; the sweep stops only after ``max_consecutive_failures`` errors in a row.
- Job ``k`` of the sweep directory is trial ``k`` of the study; each trial records its run directory and
  status in its user attributes (``run_dir``, ``status``, ``error``).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra.core.utils import JobReturn
from hydra.plugins.launcher import Launcher
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

from .search_space import SearchSpace, format_value, parse_search_space, trial_overrides

if TYPE_CHECKING:
    from optuna import Study
    from optuna.trial import Trial

log = logging.getLogger(__name__)

ENV_TRIAL = "LDM_OPTUNA_TRIAL"
ENV_STORAGE = "LDM_OPTUNA_STORAGE"
STUDY_FILE = "optuna_study.yaml"  # where report.py finds the study of a sweep directory
RESULTS_FILE = "optimization_results.yaml"
DIRECTIONS = ("minimize", "maximize")


class LdmOptunaSweeper(Sweeper):
    def __init__(
        self,
        study_name: str,
        storage: str | None,
        direction: str,
        n_trials: int,
        n_jobs: int,
        sampler: Any,
        pruner: Any,
        params: DictConfig | dict[str, str] | None,
        retry_interrupted: bool,
        max_consecutive_failures: int,
        enqueue: Sequence[Any] = (),
    ) -> None:
        if direction not in DIRECTIONS:
            raise ValueError(f"hydra.sweeper.direction={direction}: use minimize or maximize")
        if n_trials < 0 or n_jobs < 1 or max_consecutive_failures < 1:
            raise ValueError(
                "hydra.sweeper: n_trials must be >= 0, n_jobs and max_consecutive_failures >= 1 "
                f"(got {n_trials}, {n_jobs}, {max_consecutive_failures})"
            )
        self.study_name = study_name
        self.storage = storage
        self.direction = direction
        self.n_trials = n_trials
        self.n_jobs = n_jobs
        self.sampler = sampler
        self.pruner = pruner
        self.params = {str(k): str(v) for k, v in (params or {}).items()}
        self.retry_interrupted = retry_interrupted
        self.max_consecutive_failures = max_consecutive_failures
        self.enqueue = [dict(OmegaConf.to_container(e) if isinstance(e, DictConfig) else e) for e in enqueue]
        self.config: DictConfig | None = None
        self.launcher: Launcher | None = None
        self.exhausted = False  # the sampler stopped the study (every grid point tried)

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        from hydra.core.hydra_config import HydraConfig
        from hydra.core.plugins import Plugins

        HydraConfig.instance().set_config(config)  # ${hydra:runtime.cwd} in paths.* (the sweep dir) resolves
        self.config = config
        self.hydra_context = hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            config=config, hydra_context=hydra_context, task_function=task_function
        )

    # ------------------------------------------------------------------ the loop
    def sweep(self, arguments: list[str]) -> dict[str, Any]:
        assert self.config is not None and self.launcher is not None
        space = parse_search_space([f"{k}={v}" for k, v in self.params.items()] + list(arguments))
        if not space.distributions:
            raise ValueError(
                "ldm_optuna sweeper: no search space; set hydra.sweeper.params (see configs/hparams_search/) "
                "or pass a sweep override such as optim.lr='tag(log, interval(1e-4, 1e-2))'"
            )
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        self.storage = self.storage or f"sqlite:///{sweep_dir.resolve()}/optuna.db"
        study = self.load_study()
        if (
            not study.trials
        ):  # a new study: the given trials first (a restarted sweep does not add them again)
            for params in self.enqueue:
                unknown = set(params) - set(space.distributions)
                if unknown:
                    raise ValueError(
                        f"hydra.sweeper.enqueue names {sorted(unknown)}, which are not in the search space"
                    )
                study.enqueue_trial(params)
        self.write_study_file(sweep_dir)
        interrupted = recover_interrupted(study, self.retry_interrupted, sweep_dir)
        done = count_done(study)
        log.info(
            "Optuna study '%s' (%s): %d of %d trials finished, %d interrupted%s; search space: %s",
            self.study_name,
            self.storage,
            done,
            self.n_trials,
            len(interrupted),
            " (run again)" if interrupted and self.retry_interrupted else "",
            ", ".join(space.distributions),
        )
        failures_in_a_row = 0
        self.exhausted = False
        while (remaining := self.n_trials - count_done(study)) > 0 and not self.exhausted:
            trials = [study.ask(space.distributions) for _ in range(min(self.n_jobs, remaining))]
            for trial, ret in zip(trials, self.launch(trials, space), strict=True):
                status = self.tell(study, trial, ret)
                failures_in_a_row = failures_in_a_row + 1 if status == "failed" else 0
            if failures_in_a_row >= self.max_consecutive_failures:
                raise RuntimeError(
                    f"{failures_in_a_row} trials in a row failed with an error (see their train.log under "
                    f"{sweep_dir}); fix it and run the same command again to continue the study"
                )
        if self.exhausted:
            log.info("the sampler has tried every point of the search space: the sweep ends early")
        return self.write_results(study, sweep_dir)

    def launch(self, trials: list[Trial], space: SearchSpace) -> Sequence[JobReturn]:
        """One job per trial, job number = trial number (a run of consecutive numbers goes in one batch)."""
        assert self.launcher is not None
        overrides = []
        for trial in trials:
            trial.set_user_attr("job_num", trial.number)
            env = f"++hydra.job.env_set.{ENV_TRIAL}={trial.number}"
            env_storage = f"++hydra.job.env_set.{ENV_STORAGE}={format_value(self.storage)}"
            resume = trial.user_attrs.get(
                "resume_from"
            )  # a killed trial run again from its newest checkpoint
            extra = [f"ckpt_path={format_value(resume)}"] if resume else []
            overrides.append([*trial_overrides(trial.params, space.fixed), *extra, env, env_storage])
        self.validate_batch_is_legal(overrides)  # a bad search space value fails here, before any training
        numbers = [t.number for t in trials]
        if numbers == list(range(numbers[0], numbers[0] + len(numbers))):
            return self.launcher.launch(overrides, initial_job_idx=numbers[0])
        return [r for n, o in zip(numbers, overrides, strict=True) for r in self.launcher.launch([o], n)]

    def tell(self, study: Study, trial: Trial, ret: JobReturn) -> str:
        """Record one job's outcome; returns its status: finished | pruned | diverged | no_metric | failed."""
        import optuna
        from optuna.trial import TrialState

        run_dir = run_dir_of(ret)
        trial.set_user_attr("run_dir", run_dir)
        value: Any = None
        try:
            value = ret.return_value
        except optuna.TrialPruned as exc:
            status, state = "pruned", TrialState.PRUNED
            log.info("trial %d pruned: %s", trial.number, one_line(exc))
        except Exception as exc:  # the job's own error, also in its train.log
            status, state = "failed", TrialState.FAIL
            trial.set_user_attr("error", one_line(exc))
            log.error("trial %d failed (%s): %s", trial.number, run_dir, one_line(exc))
        else:
            if isinstance(value, int | float) and math.isfinite(value):
                status, state = "finished", TrialState.COMPLETE
            else:
                status = "diverged" if summary_status(run_dir) == "diverged" else "no_metric"
                state = TrialState.FAIL
                log.warning(
                    "trial %d %s (returned %r): recorded as failed, the sweep goes on",
                    trial.number,
                    status,
                    value,
                )
        trial.set_user_attr("status", status)
        try:
            study.tell(trial, float(value) if state == TrialState.COMPLETE else None, state=state)
        except RuntimeError as exc:  # grid-like samplers call study.stop() once every point was tried
            if "Study.stop" not in str(exc):
                raise
            self.exhausted = True
        return status

    # ------------------------------------------------------------------ the study and its files
    def load_study(self) -> Study:
        import optuna

        if self.storage.startswith("sqlite:///"):
            Path(self.storage.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        return optuna.create_study(
            study_name=self.study_name,
            storage=self.storage,
            sampler=self.sampler,
            pruner=self.pruner if self.pruner is not None else optuna.pruners.NopPruner(),
            direction=self.direction,
            load_if_exists=True,
        )

    def write_study_file(self, sweep_dir: Path) -> None:
        assert self.config is not None
        info = {
            "study_name": self.study_name,
            "storage": self.storage,
            "direction": self.direction,
            "metric": self.config.get("optimized_metric"),
        }
        (sweep_dir / STUDY_FILE).write_text(OmegaConf.to_yaml(OmegaConf.create(info)))

    def write_results(self, study: Study, sweep_dir: Path) -> dict[str, Any]:
        from optuna.trial import TrialState

        trials = study.get_trials(deepcopy=False)
        states = {
            s.name.lower(): sum(t.state == s for t in trials) for s in TrialState if s != TrialState.WAITING
        }
        results: dict[str, Any] = {"study_name": self.study_name, "storage": self.storage, "trials": states}
        if states["complete"]:
            best = study.best_trial
            results |= {
                "best_trial": best.number,
                "best_value": best.value,
                "best_params": best.params,
                "best_run_dir": best.user_attrs.get("run_dir"),
            }
            log.info("best trial %d: %s = %.6g, %s", best.number, self.direction, best.value, best.params)
        else:
            log.warning("Optuna study '%s': no trial completed", self.study_name)
        (sweep_dir / RESULTS_FILE).write_text(OmegaConf.to_yaml(OmegaConf.create(results)))
        return results


# ---------------------------------------------------------------------- helpers
def recover_interrupted(study: Study, retry: bool, sweep_dir: Path) -> list[int]:
    """Trials still RUNNING were killed with a previous sweeper: mark them failed; with ``retry``, enqueue
    their params again, resuming from the newest complete checkpoint of their run directory when there is
    one."""
    from optuna.trial import TrialState

    from ldm.lit.run_dir import newest_checkpoint  # here, not at the top: Hydra's plugin scan stays light

    stale = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for trial in stale:
        study.tell(trial.number, state=TrialState.FAIL)  # no "status" attribute: an interrupted trial
        if not retry:
            continue
        attrs: dict[str, Any] = {"retry_of": trial.number}
        found = newest_checkpoint(sweep_dir / str(trial.user_attrs.get("job_num", trial.number)))
        if found is not None:
            attrs["resume_from"] = str(found[0])
            log.info(
                "trial %d was interrupted at step %d: run again from %s", trial.number, found[1], found[0]
            )
        study.enqueue_trial(trial.params, user_attrs=attrs)
    return [t.number for t in stale]


def count_done(study: Study) -> int:
    """Finished trials: complete, pruned, or failed with a status (interrupted trials have none)."""
    from optuna.trial import TrialState

    return sum(
        t.state in (TrialState.COMPLETE, TrialState.PRUNED)
        or (t.state == TrialState.FAIL and "status" in t.user_attrs)
        for t in study.get_trials(deepcopy=False)
    )


def run_dir_of(ret: JobReturn) -> str | None:
    hydra_cfg = getattr(ret, "hydra_cfg", None)
    return str(hydra_cfg.hydra.runtime.output_dir) if hydra_cfg is not None else None


def summary_status(run_dir: str | None) -> str | None:
    path = Path(run_dir) / "summary.json" if run_dir else None
    if path is None or not path.is_file():
        return None
    try:
        return json.loads(path.read_text()).get("status")
    except (OSError, ValueError):
        return None


def one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:500]
