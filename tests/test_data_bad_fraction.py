"""The bad-sample fraction is exact: each bad sample counts once per epoch, against the samples read on its
rank.

Four latent shards of 125 samples, one bad sample each (0.8 %), over 2 ranks x 2 workers with the default
shuffle buffer. A batch of 25 leaves each worker 124 valid samples for a quota of 125, so every worker reads
its shard a second time (the re-read must not count again), and the shuffle buffer reads a whole shard before
the first batch (the read-ahead must count in the denominator too). The limit 1 % must never trip, and the
report must show exactly 2 bad of 250 read per rank, 1 per shard.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_overrides
from torch.utils.data import DataLoader

from ldm.data import ShardDataset, SkipCounter
from ldm.data.datamodule import BadSampleGuard, index_counts
from ldm.data.decode import load_npy
from ldm.data.shards import read_index, write_shards
from ldm.data.tar_reader import raw_samples

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]), "OMP_NUM_THREADS": "1"}
SHARDS, PER_SHARD, BAD_AT, BATCH = 4, 125, 60, 25


@pytest.fixture(scope="module")
def bad_shards(tiny_data: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The tiny latents repeated into 4 shards of 125, sample 60 of each with a NaN latent."""
    tiny = read_index(str(tiny_data["latents"] / "train.json"))
    source = list(raw_samples(tiny["paths"], SkipCounter()))
    samples = []
    for i in range(SHARDS * PER_SHARD):
        raw = source[i % len(source)]
        sample = {"__key__": f"s{i:04d}", "txt": raw["txt"], "emb.npy": raw["emb.npy"]}
        latent = np.array(load_npy(raw["latent.npy"]))
        if i % PER_SHARD == BAD_AT:
            latent[0, 0, 0] = np.nan
        samples.append({**sample, "latent.npy": latent})
    root = tmp_path_factory.mktemp("bad_fraction")
    write_shards(samples, str(root), prefix="train", max_per_shard=PER_SHARD, meta=tiny["meta"])
    urls = [str(root / f"train-{i:06d}.tar") for i in range(SHARDS)]
    return {"root": root, "urls": urls, "pattern": f"{root}/train-{{000000..{SHARDS - 1:06d}}}.tar"}


def _guard_over(ds: ShardDataset, workers: int, guard: BadSampleGuard) -> list[dict]:
    batches = []
    for batch in DataLoader(ds, batch_size=None, num_workers=workers):
        guard.update(batch)
        guard.check()  # the limit is active from the first sample (min_samples=1)
        batches.append(batch)
    return batches


@pytest.mark.parametrize("rank", [0, 1])
def test_bad_fraction_is_exact_per_rank(bad_shards: dict, rank: int) -> None:
    urls = bad_shards["urls"]
    ds = ShardDataset(
        urls,
        "latents",
        batch_size=BATCH,
        num_batches=100,
        rank=rank,
        world_size=2,
        shard_counts=index_counts(urls, {})[0],
        num_workers=2,
    )
    assert ds.shuffle_buffer == 500 and len(ds) == 10  # the default buffer; 2 workers x 5 batches of 25
    guard = BadSampleGuard(max_bad_fraction=0.01, min_samples=1, rank=rank)
    batches = _guard_over(ds, 2, guard)
    assert len(batches) == 10
    summary = guard.summary()
    mine = sorted({k.rsplit("/", 1)[-1] for k in summary["shards"]})
    assert len(mine) == 2  # a rank reads two whole shards
    assert summary["samples_read"] == 250 and summary["skipped"] == 2 and summary["delivered"] == 250
    assert summary["bad_fraction"] == pytest.approx(0.008)
    assert summary["reasons"] == {"latent_nonfinite": 2}
    assert all(reasons == {"latent_nonfinite": 1} for reasons in summary["shards"].values())


def test_cycle_passes_count_each_sample_once_per_epoch(bad_shards: dict) -> None:
    """Cycle mode reads its shards again and again within an epoch: the counts are those of one pass."""
    urls = bad_shards["urls"]
    ds = ShardDataset(urls, "latents", batch_size=BATCH, num_batches=60, mode="cycle", num_workers=2)
    guard = BadSampleGuard(max_bad_fraction=0.01, min_samples=1)
    _guard_over(ds, 2, guard)  # 60 batches of 25: three passes over the 500 samples
    summary = guard.summary()
    assert summary["samples_read"] == 500 and summary["skipped"] == 4 and summary["delivered"] == 1500
    assert summary["shards"] == {url: {"latent_nonfinite": 1} for url in urls}
    ds.set_epoch(1)  # a new epoch counts again, once
    _guard_over(ds, 2, guard)
    assert guard.summary()["samples_read"] == 1000 and guard.summary()["skipped"] == 8


def test_resumed_epoch_attaches_the_same_counts_to_the_same_batches(bad_shards: dict) -> None:
    """Batches k.. of a resumed epoch carry the counts they carry in the uninterrupted epoch: the batches
    formed again and dropped on resume count nothing."""
    urls = bad_shards["urls"]

    def counts(skip: int) -> list[tuple]:
        ds = ShardDataset(
            urls,
            "latents",
            batch_size=BATCH,
            num_batches=100,
            rank=1,
            world_size=2,
            shard_counts=index_counts(urls, {})[0],
            num_workers=2,
        )
        ds.set_epoch(0, skip)
        loader = DataLoader(ds, batch_size=None, num_workers=2)
        return [(b["__key__"], b["read"], b["skipped"], b["skipped_shards"]) for b in loader]

    full = counts(0)
    assert sum(c[1] for c in full) == 250
    for skip in (1, 3, 6):
        assert counts(skip) == full[skip:]


def test_a_sample_with_a_duplicated_member_is_one_bad_read(tmp_path: Path) -> None:
    """Two ``KEY.txt`` in one sample: which one is meant is unknown, so the sample is dropped and counted
    once."""
    from test_data_robustness import SHAPE, _good, _tar

    members = _good("a", 0) + [("a.txt", b"again")] + _good("b", 1)
    (tmp_path / "t-000000.tar").write_bytes(_tar(members))
    ds = ShardDataset(
        [str(tmp_path / "t-000000.tar")],
        "latents",
        batch_size=1,
        num_batches=1,
        latent_shape=SHAPE,
        shuffle=False,
    )
    batch = next(iter(DataLoader(ds, batch_size=None)))
    assert batch["__key__"] == ["b"] and batch["skipped"] == {"duplicate_member": 1} and batch["read"] == 2


def test_two_ddp_ranks_report_the_exact_fraction_and_do_not_stop(bad_shards: dict, tiny_data: dict) -> None:
    """train.py, DDP on 2 CPU processes with 2 workers each: one epoch with the check active from 100
    reads."""
    out = bad_shards["root"] / "run"
    args = tiny_overrides(
        tiny_data,
        out,
        f"data.train_shards='{bad_shards['pattern']}'",
        f"data.batch_size={BATCH}",
        "data.num_workers=2",
        "data.max_bad_fraction=0.01",
        "data.bad_fraction_min_samples=100",
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.precision=32-true",
        "trainer.max_steps=10",
        "trainer.check_val_every_n_epoch=100",
        "callbacks.model_checkpoint.every_n_train_steps=0",
        f"hydra.run.dir={out}",
    )
    done = subprocess.run(
        [sys.executable, "train.py", *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=400
    )
    assert done.returncode == 0, done.stderr[-3000:]
    shards: list[tuple[str, dict[str, int]]] = []
    for rank in range(2):
        report = json.loads((out / f"data_bad_shards_rank{rank}.json").read_text())
        assert report["samples_read"] == 250 and report["skipped"] == 2, report
        assert report["delivered"] == 250 and report["bad_fraction"] == pytest.approx(0.008)
        assert report["reasons"] == {"latent_nonfinite": 2}
        shards += report["shards"].items()
    # every shard on one rank only, its bad sample counted once
    assert sorted(shards) == [(url, {"latent_nonfinite": 1}) for url in bad_shards["urls"]]
