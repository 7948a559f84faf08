"""Exact resume under every save path: periodic, last, SIGTERM, SIGINT, SIGUSR1 and an exception.

A 7-step run is stopped at step 4 by each path (a signal arrives mid-step; the exception is raised after the 5th
batch was fetched but before it was trained), then resumed from the checkpoint that path wrote. The resumed run must
end with bitwise the same weights and EMA as the uninterrupted run, and the saved data position must be the batches
whose optimizer step is in the saved weights. Negative control: the same resume without the data position ends
elsewhere, so the comparison can fail.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import tiny_overrides
from hydra_utils import compose_config

import train
from ldm.lit.checkpoint_io import load_checkpoint_file
from ldm.lit.preemption import TrainingInterrupted

STEPS, STOP = 7, 4  # 3 batches of 16 per epoch (48 samples): step 4 is one batch into the second epoch
BASE = ("data.train_samples=48", "trainer.max_steps=7", "trainer.check_val_every_n_epoch=100",
        "callbacks.model_checkpoint.every_n_train_steps=4", "callbacks.model_checkpoint.save_last=false")  # fmt: skip
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
    assert (position["epoch"], position["batches"]) == (1, 1), (
        position
    )  # batch 4 = epoch 1's first, and no more
    resumed = tmp_path / "resumed"
    _run(tiny_data, resumed, f"data.num_workers={workers}", f"ckpt_path={ckpt}")
    a, b = _weights(full / "checkpoints" / "last.ckpt"), _weights(resumed / "checkpoints" / "last.ckpt")
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ after resuming from the {path} checkpoint"
    if path in ("SIGTERM", "exception"):  # negative control: the same resume without the data position
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


def test_two_gloo_ranks_resume_exactly_after_sigterm_on_rank_0(tiny_data: dict, tmp_path: Path) -> None:
    """SIGTERM reaches rank 0 only, mid-step: both ranks agree to stop after that step, one checkpoint is saved,
    both exit 143, and the resumed pair ends bitwise where the uninterrupted pair does."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(root), str(root / "tests")]),
        "OMP_NUM_THREADS": "1",
    }

    def cli(out: Path, *extra: str) -> subprocess.CompletedProcess:
        args = tiny_overrides(tiny_data, out, *BASE, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
                              "trainer.precision=32-true", f"hydra.run.dir={out}", *extra)  # fmt: skip
        return subprocess.run([sys.executable, "train.py", *args], cwd=root, env=env, capture_output=True, text=True,
                              timeout=400)  # fmt: skip

    full = cli(tmp_path / "full")
    assert full.returncode == 0, full.stderr[-3000:]
    stop = "+callbacks.stop={_target_:reliability_helpers.InterruptAt,step:3,action:SIGTERM,rank:0}"
    stopped = cli(tmp_path / "stopped", stop)
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    ckpt = tmp_path / "stopped" / "checkpoints" / "last.ckpt"
    assert load_checkpoint_file(ckpt)["global_step"] == STOP
    import json

    summary = json.loads((tmp_path / "stopped" / "summary.json").read_text())
    assert summary["interrupted"] is True and summary["global_step"] == STOP
    resumed = cli(tmp_path / "resumed", f"ckpt_path={ckpt}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = _weights(tmp_path / "full" / "checkpoints" / "last.ckpt")
    b = _weights(tmp_path / "resumed" / "checkpoints" / "last.ckpt")
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
