"""Sweeps: the Optuna sweeper (hparams_search=emoji_optuna) resumes a killed study without redoing finished
trials, records pruned and diverged trials without stopping (two jobs at once on the joblib launcher), and the
SLURM launcher config asks SLURM for GracefulStop's requeue signal."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import tiny_overrides
from omegaconf import DictConfig

from ldm.config_utils import CONFIGS

optuna = pytest.importorskip("optuna")

ROOT = Path(__file__).resolve().parents[1]
# seconds-long trials (each test sets how often they validate); the study searches optim.lr only
TRIAL = (
    "trainer.check_val_every_n_epoch=1",
    "callbacks.sample_grid.steps=2",
    "net.model_channels=32",
    "lr_schedule.warmup_steps=0",
    "optim.weight_decay=0.0",
)


def sweep_cmd(tiny_data: dict, log_dir: Path, *extra: str) -> list[str]:
    base = [a for a in tiny_overrides(tiny_data, log_dir / "unused") if not a.startswith("paths.output_dir")]
    return [sys.executable, "train.py", "-m", "hparams_search=emoji_optuna", *base, *TRIAL, *extra]


def compose_with_hydra(overrides: list[str]) -> DictConfig:
    """The train config with its hydra node (sweeper, launcher, sweep dir), as a sweep sees it."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    return cfg


def load(sweep_dir: Path) -> optuna.Study:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.load_study(study_name="emoji_optuna", storage=f"sqlite:///{sweep_dir}/optuna.db")


def test_search_space_grammar_and_the_shipped_study() -> None:
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    from hydra_plugins.ldm_optuna_sweeper.search_space import parse_search_space, trial_overrides
    from ldm.lit.optuna_pruning import OptunaPruning

    space = parse_search_space(
        [
            "optim.lr=tag(log, interval(1e-5, 1e-2))",
            "diffusion=ddpm_linear_eps,edm",
            "x=int(interval(1, 4))",
            "y=range(8, 40, 8)",
            "z=choice('a b', c)",
            "trainer.max_steps=5",
            "optim.lr=choice(1e-3, 1e-4)",
        ]
    )
    assert space.fixed == ["trainer.max_steps=5"]
    assert space.distributions["optim.lr"] == CategoricalDistribution((1e-3, 1e-4))  # the later one wins
    assert space.distributions["diffusion"] == CategoricalDistribution(("ddpm_linear_eps", "edm"))
    assert space.distributions["x"] == IntDistribution(1, 4)
    assert space.distributions["y"] == IntDistribution(8, 32, step=8)
    lines = trial_overrides({"optim.lr": 3.1e-4, "z": "a b", "flag": True}, space.fixed)
    parsed = {o.key_or_group: o.value() for o in OverridesParser.create().parse_overrides(lines)}
    assert parsed == {"trainer.max_steps": 5, "optim.lr": 3.1e-4, "z": "a b", "flag": True}

    cfg = compose_with_hydra(["hparams_search=emoji_optuna"])
    hydra_cfg = cfg.hydra
    assert hydra_cfg.sweeper._target_.endswith("LdmOptunaSweeper") and cfg.optimized_metric == "val/loss"
    # null: the sweeper puts the study in the sweep dir (Hydra resolves this node too early for paths.*)
    assert hydra_cfg.sweeper.storage is None
    assert hydra_cfg.sweep.dir.endswith("multiruns/emoji_optuna")
    shipped = parse_search_space([f"{k}={v}" for k, v in hydra_cfg.sweeper.params.items()]).distributions
    assert shipped["optim.lr"] == FloatDistribution(1e-4, 3e-3, log=True) and len(shipped) == 4
    callback = OptunaPruning(**{k: v for k, v in cfg.callbacks.optuna_pruning.items() if k != "_target_"})
    assert callback.trial_number is None  # outside a sweep the callback does nothing


def test_slurm_launcher_asks_for_graceful_stops_requeue_signal(tmp_path: Path, monkeypatch) -> None:
    """The sbatch script submitit writes from hydra/launcher=slurm: SIGUSR1 120 s early (not submitit's
    USR2)."""
    pytest.importorskip("submitit")
    import submitit
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher
    from omegaconf import OmegaConf

    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "srun").write_text("#!/bin/sh\n")
    (fake_bin / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}{os.pathsep}{os.environ['PATH']}")
    cfg = compose_with_hydra(
        ["hydra/launcher=slurm", "hydra.launcher.partition=gpu", f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    )
    params = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    launcher = SlurmLauncher(**{k: v for k, v in params.items() if k != "_target_"})
    launcher.config = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path / "sweep")}}})
    scripts = []
    monkeypatch.setattr(
        submitit.AutoExecutor,
        "map_array",
        lambda self, fn, *args: scripts.append(self._executor._make_submission_file_text("cmd", "0")) or [],
    )
    launcher.launch([["optim.lr=1e-4"]], initial_job_idx=0)
    script = scripts[0]
    assert "#SBATCH --signal=USR1@120" in script and "USR2" not in script
    assert "#SBATCH --requeue" in script and "#SBATCH --partition=gpu" in script


def test_killed_optuna_sweep_resumes_without_redoing_finished_trials(tiny_data: dict, tmp_path: Path) -> None:
    """SIGKILL once trial 1 saved its first checkpoint; the same command again keeps trial 0, runs trial 1's
    params again from that checkpoint, and adds one more trial."""
    sweep_dir = tmp_path / "train" / "multiruns" / "emoji_optuna"
    cmd = sweep_cmd(
        tiny_data,
        tmp_path,
        "trainer.max_steps=3",
        "+trainer.val_check_interval=1",
        "callbacks.model_checkpoint.every_n_train_steps=1",
        "hydra.sweeper.n_trials=3",
    )
    log = (tmp_path / "first.log").open("w")  # a file, not a pipe: a full pipe would block the sweep
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 400
    first_ckpt = sweep_dir / "1" / "checkpoints" / "step_000001.ckpt"  # written atomically (rename)
    while not ((sweep_dir / "0" / "summary.json").exists() and first_ckpt.exists()):
        assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "trial 1 did not save a checkpoint in time"
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    log.close()
    first = load(sweep_dir).trials[0]
    summary_mtime = (sweep_dir / "0" / "summary.json").stat().st_mtime_ns

    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "1 of 3 trials finished, 1 interrupted (run again)" in out.stdout + out.stderr
    trials = load(sweep_dir).trials
    states = [t.state.name for t in trials]
    assert states == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"], states
    assert trials[0].value == first.value and trials[0].params == first.params  # kept, not run again
    assert (sweep_dir / "0" / "summary.json").stat().st_mtime_ns == summary_mtime
    assert "status" not in trials[1].user_attrs  # interrupted: not counted, run again as trial 2
    assert trials[2].user_attrs["retry_of"] == 1 and trials[2].params == trials[1].params
    assert [t.user_attrs["run_dir"] for t in trials[2:]] == [str(sweep_dir / "2"), str(sweep_dir / "3")]
    resumed = json.loads((sweep_dir / "2" / "summary.json").read_text())
    assert resumed["resumed_from"] == trials[2].user_attrs["resume_from"]
    assert (
        Path(resumed["resumed_from"]).parent == sweep_dir / "1" / "checkpoints"
        and resumed["global_step"] == 3
    )
    assert list(trials[3].intermediate_values) == [1, 2, 3]  # the job reported val/loss after each step
    assert trials[2].intermediate_values[3] == trials[2].value
    assert (sweep_dir / "optimization_results.yaml").is_file()

    from ldm.report import make_report

    result = make_report([sweep_dir], tmp_path / "report")
    assert result["metric"] == "val/loss" and len(result["runs"]) == 4 and result["runs"][-1] == "1"
    assert result["pictures"]["optuna_history.png"] == "optuna_history.png"
    rows = (tmp_path / "report" / "report.csv").read_text().splitlines()
    assert rows[0].startswith("rank,run,status,trial,trial_state,optim.lr,")
    assert rows[-1].startswith("4,1,incomplete,1,interrupted,")  # the killed job: no summary.json


@pytest.mark.slow  # 41 s: two parallel training jobs (joblib)
def test_pruned_and_diverged_trials_do_not_stop_a_parallel_sweep(tiny_data: dict, tmp_path: Path) -> None:
    """Two trials at once on the joblib launcher: lr=1e30 diverges at step 1 (inf loss -> failed trial),
    lr=1e-3 is pruned at its first validation (the job reports to the shared SQLite study and raises
    TrialPruned); the sweep exits 0."""
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    sweep_dir = tmp_path / "train" / "multiruns" / "emoji_optuna"
    cmd = sweep_cmd(
        tiny_data,
        tmp_path,
        "trainer.max_steps=3",
        "+trainer.val_check_interval=2",
        "optim.lr=choice(1e30,1e-3)",
        "trainer.gradient_clip_val=null",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        "hydra.sweeper.n_jobs=2",
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.sampler._target_=optuna.samplers.BruteForceSampler",
        "~hydra.sweeper.sampler.n_startup_trials",
        "hydra.sweeper.pruner._target_=optuna.pruners.ThresholdPruner",
        "~hydra.sweeper.pruner.n_startup_trials",
        "hydra.sweeper.pruner.n_warmup_steps=0",
        "+hydra.sweeper.pruner.upper=0.0",
    )
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stderr[-3000:]
    by_lr = {t.params["optim.lr"]: t for t in load(sweep_dir).trials}
    diverged, pruned = by_lr[1e30], by_lr[1e-3]
    assert diverged.state.name == "FAIL" and diverged.user_attrs["status"] == "diverged"
    assert pruned.state.name == "PRUNED" and list(pruned.intermediate_values) == [2]
    summary = json.loads((sweep_dir / str(pruned.number) / "summary.json").read_text())
    assert summary["error"].startswith("TrialPruned: trial") and summary["global_step"] == 2
    diverged_summary = json.loads((sweep_dir / str(diverged.number) / "summary.json").read_text())
    assert diverged_summary["status"] == "diverged"


def test_emoji_fid_study_enqueues_points_of_its_own_space_at_equal_time() -> None:
    from hydra_plugins.ldm_optuna_sweeper.search_space import parse_search_space

    cfg = compose_with_hydra(["hparams_search=emoji_fid"])
    sweeper = cfg.hydra.sweeper
    assert cfg.optimized_metric == "eval/fid" and cfg.callbacks.sample_quality.at_end
    space = parse_search_space([f"{k}={v}" for k, v in sweeper.params.items()]).distributions
    for params in sweeper.enqueue:  # optuna would reject a value outside the distribution at ask()
        assert set(params) == set(space)
        for key, value in params.items():
            assert space[key]._contains(space[key].to_internal_repr(value)), (key, value)
    budget = "hparams_search/budget@budget"
    steps = {}
    for option in space[budget].choices:
        option_cfg = compose_with_hydra(["hparams_search=emoji_fid", f"{budget}={option}"])
        steps[option] = option_cfg.trainer.max_steps
        assert option_cfg.net.model_channels == int(option[1:3])
    assert steps["c64_r1"] == 300 and steps["c32_r1"] > steps["c48_r1"] > steps["c64_r1"] > steps["c96_r1"]
