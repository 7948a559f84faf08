"""2 nodes x 2 ranks: the exact-mode data plan gives every rank the same batch count and reads no sample
twice."""

from __future__ import annotations

import importlib.util
from collections import Counter
from pathlib import Path

import pytest
from torch.utils.data import DataLoader

from ldm.data.datamodule import index_counts
from ldm.data.plan import make_plan, piece_size
from ldm.data.shard_dataset import ShardDataset
from ldm.data.urls import expand_urls

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(("shards", "workers"), [(8, 2), (9, 2), (3, 4), (16, 1)])
def test_plan_four_ranks_disjoint_and_balanced(shards: int, workers: int) -> None:
    urls = [f"s{i}.tar" for i in range(shards)]
    counts = [460 + 7 * i for i in range(shards)]  # uneven, as real shards are
    plan = make_plan("exact", urls, counts, 4, workers, 16, 10**6, order_seed=3)
    read: Counter[tuple[str, int]] = Counter()
    sizes = dict(zip(urls, counts, strict=True))
    for rank in plan.pieces:
        for pieces in rank:
            for url, stride, offset in pieces:
                read.update((url, i) for i in range(offset, sizes[url], stride))
            assert sum(piece_size(p, sizes) for p in pieces) >= 0
    assert max(read.values()) == 1  # no sample in two places
    assert sum(read.values()) == sum(counts)  # and every sample somewhere
    assert {sum(q) for q in plan.quotas} == {plan.batches}  # every rank the same number of batches
    assert plan.samples_used(16) >= sum(counts) - 4 * workers * 16 - 4 * 16  # little dropped


def test_four_ranks_read_their_own_samples(tiny_data: dict, tmp_path: Path) -> None:
    """Ranks 0-3 of a world of 4 (2 DataLoader workers each) over the tiny latent shards: disjoint keys, same
    batch count per rank."""
    urls = expand_urls(f"{tiny_data['latents']}/train-{{000000..000002}}.tar")
    counts = index_counts(urls, {})[0]  # the shard index: the plan sizes each rank's share from it
    assert counts is not None
    keys: Counter[str] = Counter()
    batches = set()
    for rank in range(4):
        ds = ShardDataset(
            urls,
            "latents",
            batch_size=4,
            num_batches=10**6,
            rank=rank,
            world_size=4,
            num_workers=2,
            shard_counts=counts,
            mode="exact",
            latent_shape=(4, 8, 8),
        )
        got = [b["__key__"] for b in DataLoader(ds, batch_size=None, num_workers=2)]
        batches.add(len(got))
        keys.update(k for b in got for k in b)
    assert len(batches) == 1 and batches.pop() > 0
    assert max(keys.values()) == 1


def test_bench_key_check(tiny_data: dict) -> None:
    """bench/data_ranks.py's check: tar member keys, no key twice, none foreign, the plan's count."""
    spec = importlib.util.spec_from_file_location("bench_data_ranks", ROOT / "bench" / "data_ranks.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    dataset = bench.dataset_keys(expand_urls(f"{tiny_data['latents']}/train-{{000000..000002}}.tar"))
    keys = sorted(dataset)
    assert bench.check_keys([keys[:4], keys[4:8]], dataset, 8) == len(dataset) - 8
    for bad, used in (([keys[:4], keys[3:8]], 8), ([keys[:4], ["not-a-key"]], 5), ([keys[:4], keys[4:7]], 8)):
        with pytest.raises(AssertionError):  # read twice, not in the dataset, not the plan's count
            bench.check_keys(bad, dataset, used)
