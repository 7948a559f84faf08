"""Trust in training: signals save and exit non-zero, a diverged run stops and never saves NaN, every run has
its own directory, ckpt_path=last resumes the newest complete checkpoint, checkpoint writes name
ENOSPC/EFBIG."""

from __future__ import annotations

import errno
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_overrides

import train
from ldm.cli import UserError
from ldm.config_utils import compose_config
from ldm.lit.checkpoint_io import atomic_torch_save, load_checkpoint_file
from ldm.lit.ema import EMA
from ldm.lit.guards import NonFiniteError
from ldm.lit.run_dir import newest_checkpoint, run_id

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]), "OMP_NUM_THREADS": "1"}
SHORT = ("trainer.check_val_every_n_epoch=100", "data.train_samples=48")


def _cli(args: list[str], env: dict | None = None, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "train.py", *args],
        cwd=ROOT,
        env=env or ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"run ended before {path.name}: {proc.stderr.read()[-3000:]}")
        assert time.monotonic() < end, f"no {path} after {timeout} s"
        time.sleep(0.1)


def _finite(ckpt: Path) -> bool:
    state = load_checkpoint_file(ckpt)
    tensors = [*state["state_dict"].values(), *state.get("ema_state_dict", {}).values()]
    return all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())


# ---------------------------------------------------------------- signals from outside the process


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT", "SIGUSR1"])
def test_signal_saves_writes_the_summary_and_exits_128_plus_n(
    tiny_data: dict, tmp_path: Path, sig: str
) -> None:
    out, marker = tmp_path / "run", tmp_path / "training"
    pace = f"+callbacks.pace={{_target_:reliability_helpers.MarkAndPace,marker:'{marker}'}}"
    proc = _cli(tiny_overrides(tiny_data, out, *SHORT, "trainer.max_steps=1000", pace))
    _wait_for(marker, proc)
    proc.send_signal(signal.Signals[sig])
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.Signals[sig], err[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["interrupted"] is True and summary["status"] == "interrupted"
    assert 2 <= summary["global_step"] < 1000
    ckpt = load_checkpoint_file(out / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == summary["global_step"]
    assert "ema_state_dict" in ckpt and ckpt["ShardDataModule"]["batches"] >= 1
    assert "Traceback" not in err


def test_ctrl_c_to_the_process_group_with_loader_workers(tiny_data: dict, tmp_path: Path) -> None:
    """A terminal's Ctrl+C reaches every process of the group: the DataLoader workers ignore it, the trainer
    saves."""
    out, marker = tmp_path / "run", tmp_path / "training"
    pace = f"+callbacks.pace={{_target_:reliability_helpers.MarkAndPace,marker:'{marker}'}}"
    args = tiny_overrides(tiny_data, out, *SHORT, "trainer.max_steps=1000", "data.num_workers=2", pace)
    proc = _cli(args, start_new_session=True)
    _wait_for(marker, proc)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["interrupted"] is True
    assert load_checkpoint_file(out / "checkpoints" / "last.ckpt")["global_step"] == summary["global_step"]


def test_slurm_sigusr1_requeues_and_the_requeued_job_resumes(tiny_data: dict, tmp_path: Path) -> None:
    """Under SLURM the requeue signal saves, runs `scontrol requeue <job>`, and the restarted job (same
    command, SLURM_RESTART_COUNT=1) resumes in its own run directory slurm-<job> from that checkpoint."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "scontrol_calls"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    scontrol.chmod(scontrol.stat().st_mode | stat.S_IEXEC)
    slurm = {
        "SLURM_JOB_ID": "4242",
        "SLURM_NTASKS": "1",
        "SLURM_JOB_NAME": "ldm",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
    }
    env = {**ENV, **slurm}
    logs, marker = tmp_path / "logs", tmp_path / "training"
    args = [a for a in tiny_overrides(tiny_data, logs / "unused", *SHORT) if not a.startswith("paths.")]
    args += [f"paths.log_dir={logs}", "trainer.max_steps=12"]
    pace = f"+callbacks.pace={{_target_:reliability_helpers.MarkAndPace,marker:'{marker}'}}"
    proc = _cli([*args, pace], env=env)
    _wait_for(marker, proc)
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 138, err[-3000:]
    assert calls.read_text().split() == ["requeue", "4242"]
    run_dir = logs / "train" / "runs" / "slurm-4242"
    stopped_at = load_checkpoint_file(run_dir / "checkpoints" / "last.ckpt")["global_step"]
    assert not list(run_dir.glob("hpc_ckpt_*.ckpt"))  # no mid-step save by Lightning's handler
    restarted = _cli(args, env={**env, "SLURM_RESTART_COUNT": "1"})
    _, err = restarted.communicate(timeout=300)
    assert restarted.returncode == 0, err[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (
        summary["resumed_from"] == str(run_dir / "checkpoints" / "last.ckpt") and summary["global_step"] == 12
    )
    assert stopped_at < 12


# ---------------------------------------------------------------- divergence


def test_nonfinite_gradient_halts_naming_the_step_and_saves_no_nan(tiny_data: dict, tmp_path: Path) -> None:
    out = tmp_path / "run"
    poison = "+callbacks.poison={_target_:reliability_helpers.PoisonGradient,step:4}"
    cfg = compose_config("train", tiny_overrides(tiny_data, out, *SHORT, poison))
    with pytest.raises(NonFiniteError, match=r"non-finite gradient .* at step 4 .*lower optim.lr"):
        train.run(cfg)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["global_step"] == 4
    ckpts = sorted((out / "checkpoints").glob("*.ckpt"))
    assert ckpts and all(_finite(c) for c in ckpts)
    assert load_checkpoint_file(out / "checkpoints" / "last.ckpt")["global_step"] == 4  # the last good step


def test_a_huge_learning_rate_stops_the_cli_with_exit_3(tiny_data: dict, tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = _cli(tiny_overrides(tiny_data, out, *SHORT, "optim.lr=1e12", "trainer.gradient_clip_val=null"))
    out_text, err = proc.communicate(timeout=300)
    assert proc.returncode == 3, err[-3000:]
    text = out_text + err
    assert "NonFiniteError: non-finite" in text and "at step " in text and "Traceback" not in text
    assert all(_finite(c) for c in (out / "checkpoints").glob("*.ckpt"))


def test_skip_mode_drops_the_step_counts_it_and_finishes(tiny_data: dict, tmp_path: Path) -> None:
    out = tmp_path / "run"
    poison = "+callbacks.poison={_target_:reliability_helpers.PoisonGradient,step:2}"
    cfg = compose_config(
        "train", tiny_overrides(tiny_data, out, *SHORT, poison, "callbacks.nonfinite.action=skip")
    )
    summary = train.run(cfg)
    assert summary["status"] == "finished" and summary["global_step"] == 6
    assert summary["metrics"]["train/nonfinite_skipped"] == 1.0
    assert _finite(out / "checkpoints" / "last.ckpt")


def test_checkpoint_writer_and_ema_refuse_nonfinite_weights(tmp_path: Path) -> None:
    from ldm.lit.checkpoint_io import AtomicCheckpointIO

    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(3)}}, path)
    before = path.read_bytes()
    with pytest.raises(NonFiniteError, match=r"state_dict.w has 1 of 3 values NaN/inf"):
        AtomicCheckpointIO().save_checkpoint(
            {"state_dict": {"w": torch.tensor([1.0, float("nan"), 2.0])}}, path
        )
    assert path.read_bytes() == before and not list(tmp_path.glob(".*.tmp"))

    class Holder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Linear(2, 2)

    holder, ema = Holder(), EMA(decay=0.9)
    ema.shadow = {k: v.clone() for k, v in holder.net.state_dict().items()}
    trainer = type("T", (), {"global_step": 3, "accumulate_grad_batches": 1})()
    with torch.no_grad():
        holder.net.weight[0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match="after step 3"):
        ema.on_train_batch_end(trainer, holder, None, None, 0)
    assert all(bool(torch.isfinite(v).all()) for v in ema.shadow.values()) and ema.num_updates == 0


# ---------------------------------------------------------------- run directories and ckpt_path=last


def test_two_runs_started_together_get_their_own_directories(tiny_data: dict, tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    args = [
        a
        for a in tiny_overrides(tiny_data, logs / "unused", *SHORT, "trainer.max_steps=2")
        if not a.startswith("paths.")
    ]
    procs = [_cli([*args, f"paths.log_dir={logs}"]) for _ in range(2)]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
    runs = sorted((logs / "train" / "runs").iterdir())
    assert len(runs) == 2
    for run in runs:
        assert json.loads((run / "summary.json").read_text())["global_step"] == 2
        assert load_checkpoint_file(run / "checkpoints" / "last.ckpt")["global_step"] == 2
    assert run_id() == run_id()  # one name per process


def test_reusing_a_run_directory_is_refused_unless_resuming(tiny_data: dict, tmp_path: Path) -> None:
    out = tmp_path / "run"
    train.run(compose_config("train", tiny_overrides(tiny_data, out, *SHORT, "trainer.max_steps=3")))
    with pytest.raises(UserError, match=r"already holds checkpoints .* pass ckpt_path=last"):
        train.run(compose_config("train", tiny_overrides(tiny_data, out, *SHORT, "trainer.max_steps=5")))
    stale = out / "checkpoints" / ".last.ckpt.abcd1234.tmp"
    stale.write_bytes(b"half a checkpoint")
    summary = train.run(
        compose_config(
            "train", tiny_overrides(tiny_data, out, *SHORT, "trainer.max_steps=5", "ckpt_path=last")
        )
    )
    assert summary["global_step"] == 5 and summary["resumed_from"] == str(out / "checkpoints" / "last.ckpt")
    assert not stale.exists()
    assert (out / "csv" / "metrics.part1.csv").is_file()  # the first part's metrics are kept, not deleted
    # retention: every_n_train_steps=3 and the newest 3 kept; nothing else piles up
    names = sorted(p.name for p in (out / "checkpoints").glob("*.ckpt"))
    assert names == ["last.ckpt", "step_000003.ckpt"]


def test_ckpt_path_last_without_checkpoints_fails(tiny_data: dict, tmp_path: Path) -> None:
    cfg = compose_config("train", tiny_overrides(tiny_data, tmp_path / "logs" / "run", "ckpt_path=last"))
    with pytest.raises(FileNotFoundError, match=r"ckpt_path=last: no complete checkpoint"):
        train.run(cfg)


def test_newest_complete_checkpoint_wins(tmp_path: Path) -> None:
    """A legacy hpc_ckpt of an older step loses to a newer last.ckpt; a truncated file is never chosen."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    atomic_torch_save({"global_step": 40}, run / "hpc_ckpt_1.ckpt")
    atomic_torch_save({"global_step": 80}, run / "checkpoints" / "last.ckpt")
    atomic_torch_save({"global_step": 60}, run / "checkpoints" / "step_000060.ckpt")
    assert newest_checkpoint(run) == (run / "checkpoints" / "last.ckpt", 80)
    atomic_torch_save({"global_step": 120, "w": torch.zeros(1000)}, run / "checkpoints" / "step_000120.ckpt")
    data = (run / "checkpoints" / "step_000120.ckpt").read_bytes()
    (run / "checkpoints" / "step_000120.ckpt").write_bytes(data[: len(data) // 2])  # killed mid-copy
    assert newest_checkpoint(run) == (run / "checkpoints" / "last.ckpt", 80)


# ---------------------------------------------------------------- full disks


def test_disk_full_names_enospc_and_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "last.ckpt"
    atomic_torch_save({"step": 1}, path)
    before = path.read_bytes()
    real_fdopen = os.fdopen

    class Full:
        def __init__(self, f) -> None:
            self.f = f

        def write(self, data) -> int:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc) -> None:
            self.f.close()

    monkeypatch.setattr(os, "fdopen", lambda fd, mode: Full(real_fdopen(fd, mode)))
    with pytest.raises(OSError, match=r"could not write checkpoint .*last.ckpt.*ENOSPC") as info:
        atomic_torch_save({"step": 2, "w": torch.zeros(10)}, path)
    assert info.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert path.read_bytes() == before and not list(tmp_path.glob(".*.tmp"))


def test_file_size_limit_names_efbig(tmp_path: Path) -> None:
    code = (
        "import resource, torch\n"
        "from ldm.lit.checkpoint_io import atomic_torch_save\n"
        f"atomic_torch_save({{'step': 1}}, '{tmp_path}/last.ckpt')\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))\n"
        f"atomic_torch_save({{'w': torch.zeros(100_000)}}, '{tmp_path}/last.ckpt')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120
    )
    assert done.returncode != 0
    assert "EFBIG" in done.stderr and "could not write checkpoint" in done.stderr
    assert load_checkpoint_file(tmp_path / "last.ckpt") == {"step": 1}


def test_resume_from_a_truncated_checkpoint_is_one_line(tiny_data: dict, tmp_path: Path) -> None:
    bad = tmp_path / "half.ckpt"
    atomic_torch_save({"global_step": 3, "w": torch.zeros(1000)}, bad)
    bad.write_bytes(bad.read_bytes()[:300])
    cfg = compose_config("train", tiny_overrides(tiny_data, tmp_path / "run", f"ckpt_path={bad}"))
    with pytest.raises(UserError, match=r"does not load as a training checkpoint"):
        train.run(cfg)


def test_retention_keeps_the_newest_three_periodic_checkpoints(tiny_data: dict, tmp_path: Path) -> None:
    out = tmp_path / "run"
    cfg = compose_config(
        "train", tiny_overrides(tiny_data, out, *SHORT, "callbacks.model_checkpoint.every_n_train_steps=1")
    )
    train.run(cfg)
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["last.ckpt", "step_000004.ckpt", "step_000005.ckpt", "step_000006.ckpt"]
