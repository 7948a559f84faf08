"""2 nodes x 2 ranks: the exact-mode data plan gives every rank the same batch count and reads no sample
twice."""

from __future__ import annotations

import importlib.util
import random
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


def _read(plan, sizes: dict[str, int]) -> Counter[tuple[str, int]]:
    """(shard, sample index) of every sample in the plan's pieces, counted."""
    read: Counter[tuple[str, int]] = Counter()
    for rank in plan.pieces:
        for pieces in rank:
            for url, stride, offset in pieces:
                read.update((url, i) for i in range(offset, sizes[url], stride))
    return read


EMOJI = [500] * 7 + [246]  # data/emoji32/latents: 3746 samples in 8 shards


@pytest.mark.parametrize(
    ("world", "workers", "batches", "split", "quotas"),
    [
        (1, 0, 58, 0, [58]),
        (1, 2, 58, 0, [31, 27]),
        (2, 0, 29, 2, [29]),  # all whole: 2000 / 1746 samples -> 27 batches
        (2, 2, 28, 2, [15, 13]),  # all whole: 26
        (4, 0, 14, 4, [14]),  # all whole: 1000, 1000, 1000, 746 samples -> 11 batches (25% dropped)
        (4, 2, 14, 4, [8, 6]),  # all whole: 10 (32% dropped)
    ],
)
def test_exact_plan_uneven_shards_keeps_most_batches(
    world: int, workers: int, batches: int, split: int, quotas: list[int]
) -> None:
    """7 x 500 + 246 samples, batch 64: the plan deals the largest shards whole and splits the rest by stride
    so that the ranks fill the most batches; every sample at most once, whatever the shuffle."""
    urls = [f"s{i}.tar" for i in range(len(EMOJI))]
    sizes = dict(zip(urls, EMOJI, strict=True))
    plans = [
        make_plan("exact", urls, EMOJI, world, workers, 64, 10**6, order_seed=s) for s in (None, 1, 2, 3)
    ]
    for plan in plans:
        assert plan.batches == batches and plan.split_shards == split
        assert plan.quotas == [quotas] * world  # every rank the same batches, from the same worker quotas
        assert plan.samples_used(64) == world * batches * 64
        read = _read(plan, sizes)
        assert max(read.values()) == 1 and sum(read.values()) == sum(EMOJI)  # each sample once, none lost
        for rank, rank_quotas in zip(plan.pieces, plan.quotas, strict=True):
            caps = [sum(piece_size(p, sizes) for p in pieces) // 64 for pieces in rank]
            assert all(q <= c for q, c in zip(rank_quotas, caps, strict=True))  # each worker fills its quota
            assert all(rank)  # no idle worker
        whole = {p[0] for rank in plan.pieces for w in rank for p in w if p[1] == 1}
        assert sorted(sizes[u] for u in whole) == sorted(EMOJI)[split:]  # the largest whole
    dropped = sum(EMOJI) - plans[0].samples_used(64)
    assert dropped <= {1: 34, 2: 162, 4: 162}[world]
    assert len({str(p.pieces) for p in plans[1:]}) > 1  # the shuffle moves the shards, not the counts


def test_exact_plan_splits_no_more_than_the_batches_need() -> None:
    """Among layouts that fill as many batches the plan splits fewest shards: with num_batches at what all
    whole fills (10 at 4 ranks x 2 workers), nothing is split; more batches split more."""
    urls = [f"s{i}.tar" for i in range(len(EMOJI))]
    plan = make_plan("exact", urls, EMOJI, 4, 2, 64, 10, order_seed=1)
    assert plan.batches == 10 and plan.split_shards == 0
    assert all(p[1] == 1 for rank in plan.pieces for w in rank for p in w)
    assert make_plan("exact", urls, EMOJI, 4, 2, 64, 12, order_seed=1).split_shards == 3  # 1000/500/500/500
    assert make_plan("exact", urls, EMOJI, 4, 2, 64, 14, order_seed=1).split_shards == 4


@pytest.mark.parametrize("seed", range(6))
def test_exact_plan_random_shards_at_most_once_and_shuffle_free_counts(seed: int) -> None:
    """Random shard sizes (some empty), ranks, workers and batch sizes: no sample twice, every sample in some
    piece, equal batches per rank, batch count and quotas the same for every shuffle."""
    rng = random.Random(seed)
    for _ in range(20):
        n = rng.randint(1, 24)
        counts = [rng.choice([0, 500, rng.randint(1, 600)]) for _ in range(n)]
        urls = [f"s{i}.tar" for i in range(n)]
        world, workers, batch = rng.choice([1, 2, 3, 4, 8]), rng.choice([0, 1, 2, 4]), rng.choice([1, 16, 64])
        cap = rng.choice([10**6, rng.randint(0, 30)])
        plans = [make_plan("exact", urls, counts, world, workers, batch, cap, order_seed=s) for s in (1, 2)]
        assert plans[0].batches == plans[1].batches <= cap and plans[0].quotas == plans[1].quotas
        for plan in plans:
            read = _read(plan, dict(zip(urls, counts, strict=True)))
            assert max(read.values(), default=1) == 1 and sum(read.values()) == sum(counts)
            assert {sum(q) for q in plan.quotas} == {plan.batches}
        assert plans[0].batches <= sum(counts) // world // batch  # never more than the samples allow


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
