"""Loader settings that fit the machine: worker count, float16 batches from workers, pinned memory only on a
GPU."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
import torch

from ldm.data.datamodule import ShardDataModule
from ldm.data.loader_settings import resolve_num_workers, to_float16


def test_resolve_num_workers() -> None:
    assert resolve_num_workers("auto", 1, cpus=2) == 1  # one core left to training on a 2-core box
    assert resolve_num_workers("auto", 1, cpus=1) == 0
    assert resolve_num_workers("auto", 1, cpus=32) == 4
    assert resolve_num_workers("auto", 8, cpus=32) == 3  # per rank: 8 ranks on the node
    assert resolve_num_workers(4, 1, cpus=2) == 2  # PyTorch warns above the usable cores
    assert resolve_num_workers(0, 1, cpus=2) == 0
    with pytest.raises(ValueError, match="num_workers"):
        resolve_num_workers("many")


def test_to_float16_halves_float_tensors_only() -> None:
    batch = {
        "latent": torch.randn(2, 4, 8, 8),
        "cls": torch.tensor([1, 2]),
        "txt": ["a", "b"],
        "context": torch.randn(2, 3, 5).half().float(),
    }
    out = to_float16(dict(batch))
    assert (
        out["latent"].dtype == torch.float16 and out["cls"].dtype == torch.long and out["txt"] == ["a", "b"]
    )
    assert torch.equal(out["context"].float(), batch["context"])  # fp16-stored embeddings: lossless


def test_datamodule_float16_workers_roundtrip_without_warnings(tiny_data: dict, tmp_path: Path) -> None:
    """2 workers sending float16: the batches come back float32 and equal (fp16 latent shards), and neither
    PyTorch's worker-count warning nor the pin_memory one fires on a CPU box."""
    shards = f"{tiny_data['latents']}/train-{{000000..000002}}.tar"
    batches = {}
    for dtype in ("float32", "float16"):
        dm = ShardDataModule(shards, batch_size=8, num_workers=8, worker_dtype=dtype, mode="exact")
        assert dm.num_workers <= len(os.sched_getaffinity(0))
        dm.setup("fit")
        dm.set_epoch(0)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            batch = dm.on_after_batch_transfer(next(iter(dm.train_dataloader())), 0)
        assert batch["latent"].dtype == torch.float32 and batch["context"].dtype == torch.float32
        batches[dtype] = batch
    assert batches["float16"]["__key__"] == batches["float32"]["__key__"]
    torch.testing.assert_close(batches["float16"]["latent"], batches["float32"]["latent"], rtol=0, atol=0)
    torch.testing.assert_close(batches["float16"]["context"], batches["float32"]["context"], rtol=0, atol=0)
    with pytest.raises(ValueError, match="worker_dtype"):
        ShardDataModule(shards, worker_dtype="bfloat16")
