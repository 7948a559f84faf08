"""Data order across ranks and workers, and exact mid-epoch resume.

Two gloo processes read 3 shards (uneven over 2 ranks) with 1 and 2 workers in the exact and resampled modes:
the same number of batches on both ranks, disjoint keys in an exact epoch, the order a function of the seed. A
run stopped at step k and resumed from its step-k checkpoint trains on the same sample keys, with the same
losses, as the uninterrupted run (0 and 2 workers, 2 ranks); with the data position not restored the keys
differ.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import tiny_overrides
from resume_helpers import CONFIGS, EPOCHS, read_keys, read_losses
from torch.utils.data import DataLoader

import train
from ldm.config_utils import compose_config
from ldm.data import ShardDataset
from ldm.data.plan import make_plan, resume_rotation, worker_share

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]), "OMP_NUM_THREADS": "1"}
STEPS, STOP = 7, 4  # 3 batches per epoch: the checkpoint at step 4 is one batch into the second epoch
RESUME = (
    "trainer.max_steps=7",
    "trainer.check_val_every_n_epoch=100",
    "callbacks.model_checkpoint.every_n_train_steps=4",
    "callbacks.model_checkpoint.save_last=false",
    "+callbacks.keys={_target_:resume_helpers.KeyRecorder}",
)


def _shards(tiny_data: dict) -> str:
    return f"{tiny_data['latents']}/train-{{000000..000002}}.tar"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- the plan


def test_worker_share_follows_the_dataloader_round_robin() -> None:
    quotas = [4, 1, 2]  # the loader takes w0 w1 w2 w0 w2 w0 w0
    order = [0, 1, 2, 0, 2, 0, 0]
    for taken in range(len(order) + 1):
        assert worker_share(taken, quotas) == [order[:taken].count(w) for w in range(3)]
        assert resume_rotation(taken, quotas) == (order[taken] if taken < len(order) else 0)


def test_exact_plan_uses_every_shard_once_and_evens_out_ranks() -> None:
    urls = [f"s{i}" for i in range(5)]
    plan = make_plan("exact", urls, [40, 40, 40, 40, 17], 2, 2, 16, 100, order_seed=3)
    pieces = [p for rank in plan.pieces for worker in rank for p in worker]
    assert sorted(p[0] for p in pieces if p[1] == 1) == ["s0", "s1", "s2", "s3"]  # whole, once
    assert sorted(p for p in pieces if p[1] != 1) == [("s4", 2, 0), ("s4", 2, 1)]  # the smallest, split
    # per rank 40 + 40 + 9 (or 8) of s4: workers 40 + 9 -> 3 batches and 40 -> 2
    assert plan.batches == 5 and plan.quotas == [[3, 2], [3, 2]]
    again = make_plan("exact", urls, [40, 40, 40, 40, 17], 2, 2, 16, 100, order_seed=4)
    assert again.batches == plan.batches and again.pieces != plan.pieces  # new order, same count


@pytest.mark.parametrize("mode", ["exact", "resampled", "cycle"])
@pytest.mark.parametrize("workers", [0, 2])
def test_skipping_batches_continues_the_epoch(tiny_data: dict, mode: str, workers: int) -> None:
    """set_epoch(e, k) yields exactly batches k.. of the uninterrupted epoch, also with uneven worker
    quotas."""
    from ldm.data.datamodule import index_counts
    from ldm.data.urls import expand_urls

    urls = expand_urls(_shards(tiny_data))
    counts = index_counts(urls, {})[0]

    def keys(skip: int) -> list[list[str]]:
        ds = ShardDataset(
            urls,
            "latents",
            batch_size=8,
            num_batches=5,
            rank=1,
            world_size=2,
            shuffle_buffer=8,
            mode=mode,
            shard_counts=counts,
            num_workers=workers,
        )
        ds.set_epoch(1, skip)
        return [b["__key__"] for b in DataLoader(ds, batch_size=None, num_workers=workers)]

    full = keys(0)
    assert len(full) == 5
    for skip in (1, 3):
        assert keys(skip) == full[skip:]


# ---------------------------------------------------------------- two gloo ranks, uneven shards


def test_two_gloo_ranks_uneven_shards_same_batches_disjoint_keys(tiny_data: dict, tmp_path: Path) -> None:
    port = _free_port()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "tests" / "resume_helpers.py"),
                "--rank",
                str(r),
                "--world",
                "2",
                "--port",
                str(port),
                "--shards",
                _shards(tiny_data),
                "--out",
                str(tmp_path),
            ],
            cwd=ROOT,
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(2)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err[-3000:]
    ranks = [json.loads((tmp_path / f"gloo_rank{r}.json").read_text()) for r in range(2)]
    for mode, workers in CONFIGS:
        name = f"{mode}/{workers}"
        for epoch in EPOCHS:
            batches = [ranks[r][name][epoch] for r in range(2)]
            # 114 samples (40, 40, 34), 2 ranks: exact 40 + 17 per rank -> 3 batches of 16; resampled 114 //
            # 32 = 3
            assert len(batches[0]) == len(batches[1]) == 3, (name, epoch)
            if mode == "exact":
                keys = [k for rank in batches for b in rank for k in b]
                assert len(keys) == len(set(keys)) == 96, (name, epoch)  # disjoint across ranks, none twice
        if mode == "exact":
            assert ranks[0][name][0] != ranks[0][name][1]  # a new order per epoch
    # the order is a function of the seed: rank 1 of the gloo run == the same rank built in this process
    from ldm.data.datamodule import index_counts
    from ldm.data.urls import expand_urls

    urls = expand_urls(_shards(tiny_data))
    ds = ShardDataset(
        urls,
        "latents",
        batch_size=16,
        num_batches=3,
        rank=1,
        world_size=2,
        shuffle_buffer=8,
        shard_counts=index_counts(urls, {})[0],
        num_workers=2,
    )
    ds.set_epoch(1)
    assert [b["__key__"] for b in DataLoader(ds, batch_size=None, num_workers=2)] == ranks[1]["exact/2"][1]


# ---------------------------------------------------------------- mid-epoch resume


def _overrides(tiny_data: dict, out: Path, *extra: str) -> list[str]:
    return tiny_overrides(tiny_data, out, *RESUME, *extra)


@pytest.fixture(scope="module")
def uninterrupted(tiny_data: dict, tmp_path_factory: pytest.TempPathFactory) -> Callable[[int], Path]:
    """The 7-step run with a checkpoint at step 4, per number of workers (made once)."""
    runs: dict[int, Path] = {}

    def get(workers: int) -> Path:
        if workers not in runs:
            out = tmp_path_factory.mktemp(f"full{workers}") / "run"
            cfg = _overrides(tiny_data, out, "data.train_samples=48", f"data.num_workers={workers}")
            assert train.run(compose_config("train", cfg))["global_step"] == STEPS
            runs[workers] = out
        return runs[workers]

    return get


def _resume(tiny_data: dict, full: Path, out: Path, *extra: str) -> Path:
    ckpt = full / "checkpoints" / f"step_{STOP:06d}.ckpt"
    train.run(compose_config("train", _overrides(tiny_data, out, f"ckpt_path={ckpt}", *extra)))
    return out


@pytest.mark.parametrize("workers", [0, 2])
def test_mid_epoch_resume_trains_on_the_same_keys(
    tiny_data: dict, tmp_path: Path, uninterrupted: Callable[[int], Path], workers: int
) -> None:
    full = uninterrupted(workers)
    resumed = _resume(
        tiny_data, full, tmp_path / "resumed", "data.train_samples=48", f"data.num_workers={workers}"
    )
    keys, again = read_keys(full), read_keys(resumed)
    assert sorted(keys) == list(range(STEPS)) and sorted(again) == list(range(STOP, STEPS))
    assert again == {step: keys[step] for step in range(STOP, STEPS)}
    losses, resumed_losses = read_losses(full), read_losses(resumed)
    assert sorted(resumed_losses) == list(range(STOP, STEPS))
    for step, loss in resumed_losses.items():
        assert loss == pytest.approx(losses[step], rel=1e-5, abs=1e-7)


def test_negative_control_without_the_data_position_keys_differ(
    tiny_data: dict, tmp_path: Path, uninterrupted: Callable[[int], Path]
) -> None:
    """The same comparison with data.restore_position=false must fail: the epoch restarts from its first
    batch."""
    full = uninterrupted(0)
    resumed = _resume(
        tiny_data, full, tmp_path / "resumed", "data.train_samples=48", "data.restore_position=false"
    )
    keys, again = read_keys(full), read_keys(resumed)
    assert sorted(again) == list(range(STOP, STEPS))
    assert again != {step: keys[step] for step in range(STOP, STEPS)}
    assert again[STOP] == keys[STOP - 1]  # step 4 got the epoch's first batch again (step 3's)
    losses, resumed_losses = read_losses(full), read_losses(resumed)
    assert resumed_losses[STOP] != pytest.approx(losses[STOP], rel=1e-5, abs=1e-7)


def test_mid_epoch_resume_two_ranks(tiny_data: dict, tmp_path: Path) -> None:
    """DDP on 2 CPU processes (gloo), 3 shards: every rank resumes on its own keys; the ranks never share
    one."""

    def cli(out: Path, *extra: str) -> None:
        args = _overrides(
            tiny_data,
            out,
            "trainer=ddp",
            "trainer.accelerator=cpu",
            "trainer.devices=2",
            "trainer.precision=32-true",
            f"hydra.run.dir={out}",
            *extra,
        )
        done = subprocess.run(
            [sys.executable, "train.py", *args],
            cwd=ROOT,
            env=ENV,
            capture_output=True,
            text=True,
            timeout=400,
        )
        assert done.returncode == 0, done.stderr[-3000:]

    full, resumed = tmp_path / "full", tmp_path / "resumed"
    cli(full)  # 114 samples (40, 40, 34) over 2 ranks: 40 + 17 per rank, 3 batches of 16 per epoch
    cli(resumed, f"ckpt_path={full / 'checkpoints' / f'step_{STOP:06d}.ckpt'}")
    for rank in range(2):
        keys, again = read_keys(full, rank), read_keys(resumed, rank)
        assert sorted(keys) == list(range(STEPS))
        assert again == {step: keys[step] for step in range(STOP, STEPS)}
    both = [read_keys(full, r) for r in range(2)]
    for epoch_steps in (range(0, 3), range(3, 6)):
        seen = [k for r in range(2) for s in epoch_steps for k in both[r][s]]
        assert len(seen) == len(set(seen)) == 96
    losses, resumed_losses = read_losses(full), read_losses(resumed)
    for step, loss in resumed_losses.items():
        assert loss == pytest.approx(losses[step], rel=1e-5, abs=1e-7)
