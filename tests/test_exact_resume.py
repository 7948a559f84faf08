"""Exact resume under every save path: periodic, last, SIGTERM, SIGINT, SIGUSR1 and an exception.

A 7-step run is stopped at step 4 by each path (a signal arrives mid-step; the exception is raised after the
5th batch was fetched but before it was trained), then resumed from the checkpoint that path wrote. The
resumed run must end with bitwise the same weights and EMA as the uninterrupted run, and the saved data
position must be the batches whose optimizer step is in the saved weights. Negative control: the same resume
without the data position ends elsewhere, so the comparison can fail.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import tiny_overrides

import train
from ldm.config_utils import compose_config
from ldm.lit.checkpoint_io import load_checkpoint_file
from ldm.lit.preemption import TrainingInterrupted

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]), "OMP_NUM_THREADS": "1"}
STEPS, STOP = 7, 4  # 3 batches of 16 per epoch (48 samples): step 4 is one batch into the second epoch
BASE = (
    "data.train_samples=48",
    "trainer.max_steps=7",
    "trainer.check_val_every_n_epoch=100",
    "callbacks.model_checkpoint.every_n_train_steps=4",
    "callbacks.model_checkpoint.save_last=false",
)
PATHS = ["periodic", "last", "SIGTERM", "SIGINT", "SIGUSR1", "exception"]


def _run(tiny_data: dict, out: Path, *extra: str) -> dict:
    return train.run(compose_config("train", tiny_overrides(tiny_data, out, *BASE, *extra)))


def _weights(ckpt: Path) -> dict[str, torch.Tensor]:
    state = load_checkpoint_file(ckpt)
    return {**state["state_dict"], **{f"ema.{k}": v for k, v in state["ema_state_dict"].items()}}


@pytest.fixture(scope="module")
def uninterrupted(tiny_data: dict, tmp_path_factory: pytest.TempPathFactory) -> Callable[[int], Path]:
    runs: dict[int, Path] = {}

    def get(workers: int) -> Path:
        if workers not in runs:
            out = tmp_path_factory.mktemp(f"full{workers}") / "run"
            assert _run(tiny_data, out, f"data.num_workers={workers}")["global_step"] == STEPS
            runs[workers] = out
        return runs[workers]

    return get


def _stop_at_step_4(tiny_data: dict, full: Path, out: Path, path: str, workers: int) -> Path:
    """The checkpoint of step 4 written by ``path``."""
    if path == "periodic":
        return full / "checkpoints" / f"step_{STOP:06d}.ckpt"
    if path == "last":  # the end-of-training save of a run whose max_steps is 4
        _run(tiny_data, out, f"data.num_workers={workers}", f"trainer.max_steps={STOP}")
        return out / "checkpoints" / "last.ckpt"
    action = path  # a signal name, or "exception" (raised after batch 5 was fetched, before it trained)
    at = STOP - 1 if path != "exception" else STOP
    extra = f"+callbacks.stop={{_target_:reliability_helpers.InterruptAt,step:{at},action:{action}}}"
    expected = TrainingInterrupted if path != "exception" else RuntimeError
    with pytest.raises(expected) as info:
        _run(tiny_data, out, f"data.num_workers={workers}", extra)
    if path != "exception":
        assert info.value.exit_code == 128 + signal.Signals[path] and info.value.step == STOP
    return out / "checkpoints" / "last.ckpt"


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("path", PATHS)
def test_resume_is_exact_after_every_save_path(
    tiny_data: dict, tmp_path: Path, uninterrupted: Callable[[int], Path], path: str, workers: int
) -> None:
    full = uninterrupted(workers)
    ckpt = _stop_at_step_4(tiny_data, full, tmp_path / "stopped", path, workers)
    saved = load_checkpoint_file(ckpt)
    assert saved["global_step"] == STOP
    position = _data_position(saved)
    assert position["bad_samples"]["delivered"] == STOP * 16  # the totals of the trained batches travel too
    assert (position["epoch"], position["batches"]) == (1, 1), (
        position
    )  # batch 4 = epoch 1's first, and no more
    resumed = tmp_path / "resumed"
    _run(tiny_data, resumed, f"data.num_workers={workers}", f"ckpt_path={ckpt}")
    a, b = _weights(full / "checkpoints" / "last.ckpt"), _weights(resumed / "checkpoints" / "last.ckpt")
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ after resuming from the {path} checkpoint"
    if workers == 0 or path in ("SIGTERM", "exception"):  # negative control: resume without the data position
        control = tmp_path / "control"
        _run(
            tiny_data,
            control,
            f"data.num_workers={workers}",
            f"ckpt_path={ckpt}",
            "data.restore_position=false",
        )
        c = _weights(control / "checkpoints" / "last.ckpt")
        assert any(not torch.equal(a[k], c[k]) for k in a)


def _data_position(checkpoint: dict) -> dict:
    """The ShardDataModule's state in a Lightning checkpoint (stored under the datamodule's class name)."""
    return checkpoint["ShardDataModule"]


def _ddp(tiny_data: dict, out: Path, *extra: str) -> subprocess.CompletedProcess:
    args = tiny_overrides(
        tiny_data,
        out,
        *BASE,
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.precision=32-true",
        f"hydra.run.dir={out}",
        *extra,
    )
    return subprocess.run(
        [sys.executable, "train.py", *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=400
    )


@pytest.fixture(scope="module")
def uninterrupted_ddp(tiny_data: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("full_ddp") / "run"
    done = _ddp(tiny_data, out)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


DDP_STOPS = {  # path -> (extra override, expected exit code)
    "SIGTERM": (
        "+callbacks.stop={_target_:reliability_helpers.InterruptAt,step:3,action:SIGTERM,rank:0}",
        143,
    ),
    "SIGINT": ("+callbacks.stop={_target_:reliability_helpers.InterruptAt,step:3,action:SIGINT,rank:1}", 130),
    "SIGUSR1": ("+callbacks.stop={_target_:reliability_helpers.InterruptAt,step:3,action:SIGUSR1}", 138),
    "exception": ("+callbacks.stop={_target_:reliability_helpers.InterruptAt,step:4,action:exception}", 1),
    "last": ("trainer.max_steps=4", 0),
}
SLOW = pytest.mark.slow


@pytest.mark.parametrize(
    "path", ["SIGTERM", *(pytest.param(p, marks=SLOW) for p in ("SIGINT", "SIGUSR1", "exception", "last"))]
)
def test_two_gloo_ranks_resume_exactly(
    tiny_data: dict, tmp_path: Path, uninterrupted_ddp: Path, path: str
) -> None:
    """Two DDP processes: a signal reaching one rank (or both), mid-step, stops both after that step with one
    checkpoint; an exception on both saves the last completed step. The resumed pair ends bitwise where the
    uninterrupted pair does (SIGTERM in the default suite, the other paths with -m slow)."""
    extra, code = DDP_STOPS[path]
    stopped = _ddp(tiny_data, tmp_path / "stopped", extra)
    assert stopped.returncode == code, stopped.stderr[-3000:]
    ckpt = tmp_path / "stopped" / "checkpoints" / "last.ckpt"
    saved = load_checkpoint_file(ckpt)
    assert (
        saved["global_step"] == STOP
    )  # (24 samples per rank: one batch per epoch, so the position is per epoch)
    summary = json.loads((tmp_path / "stopped" / "summary.json").read_text())
    assert summary["interrupted"] is (code > 128) and summary["global_step"] == STOP
    resumed = _ddp(tiny_data, tmp_path / "resumed", f"ckpt_path={ckpt}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = _weights(uninterrupted_ddp / "checkpoints" / "last.ckpt")
    b = _weights(tmp_path / "resumed" / "checkpoints" / "last.ckpt")
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


@pytest.mark.slow  # a DDP pair; the single-process halt is in the default suite (test_reliability.py)
def test_nonfinite_gradient_on_one_rank_halts_both(tiny_data: dict, tmp_path: Path) -> None:
    """A NaN gradient on rank 1 only (after the all-reduce) stops both ranks before the step, exit 3, no NaN
    saved."""
    poison = "+callbacks.poison={_target_:reliability_helpers.PoisonGradient,step:2,rank:1}"
    done = _ddp(tiny_data, tmp_path / "run", poison)
    assert done.returncode == 3, done.stderr[-3000:]
    assert "non-finite gradient" in done.stderr and "at step 2" in done.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["global_step"] == 2
