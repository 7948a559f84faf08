"""Nothing lost silently: every kind of damaged sample or shard is skipped, counted per reason and per shard,
the counts reach the run directory, and too many bad samples stop the run naming the worst shards."""

from __future__ import annotations

import csv
import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_overrides
from PIL import Image
from torch.utils.data import DataLoader

import train
from ldm.config_utils import compose_config
from ldm.data import ShardDataModule, ShardDataset, SkipCounter
from ldm.data.tar_reader import raw_samples, tar_members
from ldm.data.urls import ShardStream

SHAPE = (4, 8, 8)


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _tar(members: list[tuple[str, bytes]], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _good(key: str, seed: int) -> list[tuple[str, bytes]]:
    rng = np.random.default_rng(seed)
    return [
        (f"{key}.latent.npy", _npy(rng.standard_normal(SHAPE).astype(np.float16))),
        (f"{key}.txt", f"caption {key}".encode()),
        (f"{key}.emb.npy", _npy(rng.standard_normal((3, 16)).astype(np.float16))),
    ]


def _latent(key: str, array: np.ndarray, caption: bytes = b"fine caption") -> list[tuple[str, bytes]]:
    return [(f"{key}.latent.npy", _npy(array)), (f"{key}.txt", caption)]


def _defects() -> list[tuple[str, bytes]]:
    """One sample per sample-level defect (and a second NaN-like and undecodable one), reason in the key."""
    ok = np.zeros(SHAPE, np.float16)
    nan, inf = ok.copy(), ok.copy()
    nan[1, 2, 3], inf[0, 0, 0] = np.nan, -np.inf
    bad_emb = np.full((3, 16), np.nan, np.float16)
    return [
        ("nocap.latent.npy", _npy(ok)),
        *_latent("blank", ok, b"  \n"),
        *_latent("long", ok, b"x" * 1001),
        *_latent("shape", np.zeros((4, 4, 4), np.float16)),
        *_latent("dtype", np.zeros(SHAPE, np.float32)),
        *_latent("nan", nan),
        *_latent("inf", inf),
        ("badnpy.latent.npy", b"\x93NUMPY garbage"),
        ("badnpy.txt", b"caption"),
        *_latent("utf", ok, b"\xff\xfe caption"),
        ("nolatent.txt", b"a caption without a latent"),
        *_latent("emb", ok),
        ("emb.emb.npy", _npy(bad_emb)),
        *_latent("cls", ok),
        ("cls.cls", b"seven"),
    ]


EXPECTED_A = {
    "missing_caption": 2,
    "caption_too_long": 1,
    "latent_shape": 1,
    "latent_dtype": 1,
    "latent_nonfinite": 2,
    "decode_error": 1,
    "caption_not_utf8": 1,
    "missing_latent": 1,
    "bad_embedding": 1,
    "bad_label": 1,
}


def _write_defect_shards(root: Path) -> tuple[list[str], list[str]]:
    """a: defects then 4 good; b: 4 good then a sample cut mid-member; c: 3 good, a sample whose first header
    is garbled, 1 good; d: missing. Returns (urls in reading order, good keys in reading order)."""
    good = {s: [f"{s}{i}" for i in range(4)] for s in "abc"}
    members = {s: [m for i, k in enumerate(keys) for m in _good(k, i)] for s, keys in good.items()}
    (root / "train-000000.tar").write_bytes(_tar(_defects() + members["a"]))
    cut = _tar(members["b"] + _good("cut", 99), fmt=tarfile.GNU_FORMAT)
    offset = next(m.offset_data for m in tarfile.open(fileobj=io.BytesIO(cut)) if m.name == "cut.latent.npy")
    (root / "train-000001.tar").write_bytes(cut[: offset + 100])
    before, after = members["c"][:9], members["c"][9:]  # 3 members per sample
    garbled = _tar(before + _good("junk", 98) + after)
    end = _archive_end(before)  # where junk.latent.npy's header starts
    (root / "train-000002.tar").write_bytes(garbled[:end] + b"\x01" * 512 + garbled[end + 512 :])
    index = {
        "shards": [f"train-00000{i}.tar" for i in range(4)],
        "counts": [4, 4, 4, 4],
        "total": 16,
        "meta": {"latent_shape": list(SHAPE), "latent_dtype": "float16"},
    }
    (root / "train.json").write_text(json.dumps(index))
    urls = [str(root / f"train-00000{i}.tar") for i in (3, 2, 1, 0)]
    return urls, good["c"] + good["b"] + good["a"]


def _archive_end(members: list[tuple[str, bytes]]) -> int:
    """Byte offset right after the last member's data (where the next header would start)."""
    data = _tar(members)
    last = tarfile.open(fileobj=io.BytesIO(data)).getmembers()[-1]
    return last.offset_data + (last.size + 511) // 512 * 512


def _totals(batches: list[dict], field: str = "skipped") -> dict:
    total: dict = {}
    for b in batches:
        for k, v in b[field].items():
            if isinstance(v, dict):
                inner = total.setdefault(k, {})
                for r, n in v.items():
                    inner[r] = inner.get(r, 0) + n
            else:
                total[k] = total.get(k, 0) + v
    return total


def test_each_defect_is_counted_exactly_and_every_good_sample_arrives(tmp_path: Path) -> None:
    urls, good = _write_defect_shards(tmp_path)
    ds = ShardDataset(
        urls,
        "latents",
        batch_size=4,
        num_batches=3,
        shuffle=False,
        latent_shape=SHAPE,
        latent_dtype="float16",
        max_caption_chars=1000,
    )
    batches = list(DataLoader(ds, batch_size=None))
    assert [k for b in batches for k in b["__key__"]] == good
    assert all(b["latent"].shape == (4, *SHAPE) and b["context"].shape == (4, 3, 16) for b in batches)
    # the garbled header costs its member only: the reader goes on from the next valid header (junk.txt)
    after_garble = {"corrupt_shard": 1, "missing_latent": 1}
    assert _totals(batches, "skipped_shards") == {
        urls[0]: {"read_error": 1},
        urls[1]: after_garble,
        urls[2]: {"truncated_shard": 1},
        urls[3]: EXPECTED_A,
    }
    expected = {**EXPECTED_A, "read_error": 1, "corrupt_shard": 1, "truncated_shard": 1, "missing_latent": 2}
    assert _totals(batches) == expected


def test_bad_fraction_limit_names_the_worst_shard(tmp_path: Path) -> None:
    _write_defect_shards(tmp_path)
    dm = ShardDataModule(
        f"{tmp_path}/train-{{000000..000003}}.tar",
        batch_size=4,
        max_bad_fraction=0.2,
        bad_fraction_min_samples=1,
    )
    assert dm.latent_shape == SHAPE and dm.latent_dtype == "float16" and dm.train_samples == 12
    dm.setup("fit")
    with pytest.raises(RuntimeError) as caught:
        for batch in dm.train_dataloader():
            dm.guard.update(batch)
            dm.guard.check()
    message = str(caught.value)
    assert "\n" not in message
    assert "were bad, over data.max_bad_fraction=0.2: worst shards " in message
    assert f"{tmp_path}/train-000000.tar (12: bad_embedding 1, bad_label 1, caption_not_utf8 1" in message
    assert message.endswith("or raise data.max_bad_fraction (null turns the check off)")
    summary = dm.guard.summary()
    assert summary["shards"][f"{tmp_path}/train-000000.tar"] == EXPECTED_A


def test_image_decode_error_and_missing_image(tmp_path: Path) -> None:
    png = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), 90, np.uint8)).save(png, format="PNG")
    members = [
        ("bad.png", b"\x89PNG not really"),
        ("bad.txt", b"x"),
        ("noimg.txt", b"y"),
        ("good.png", png.getvalue()),
        ("good.txt", b"a grey square"),
    ]
    (tmp_path / "img-000000.tar").write_bytes(_tar(members, fmt=tarfile.USTAR_FORMAT))
    ds = ShardDataset([str(tmp_path / "img-000000.tar")], "images", batch_size=1, num_batches=1, image_size=8)
    batch = next(iter(DataLoader(ds, batch_size=None)))
    assert batch["__key__"] == ["good"] and batch["image"].shape == (1, 3, 8, 8)
    assert batch["skipped"] == {"decode_error": 1, "missing_image": 1}


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_tar_reader_long_names_and_formats(tmp_path: Path, fmt: int) -> None:
    long_dir = "d" * 120 if fmt != tarfile.USTAR_FORMAT else "d" * 60  # ustar: a prefix, not a long name
    names = [f"{long_dir}/k{'x' * 80}.txt", "k2.txt", "k2.latent.npy", "k3.TXT"]
    data = _tar([(n, n.encode()) for n in names], fmt=fmt)
    (tmp_path / "t.tar").write_bytes(data)
    assert list(tar_members(ShardStream(str(tmp_path / "t.tar"), {}))) == [(n, n.encode()) for n in names]
    counter = SkipCounter()
    samples = list(raw_samples([str(tmp_path / "t.tar")], counter))
    assert [s["__key__"] for s in samples] == [f"{long_dir}/k{'x' * 80}", "k2", "k3"]
    assert set(samples[1]) == {"__key__", "__url__", "txt", "latent.npy"} and "txt" in samples[2]
    assert counter.as_dict() == {}
    (tmp_path / "cut.tar").write_bytes(data[: len(data) - 1024 * 10])  # no end-of-archive block
    list(raw_samples([str(tmp_path / "cut.tar")], counter))
    assert counter.as_dict() == {"truncated_shard": 1}


def _prepend(shard: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(shard) as tar:
        original = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers() if m.isfile()]
    shard.write_bytes(_tar(members + original))


def test_counts_reach_the_run_directory_and_the_limit_stops_the_run(tiny_data: dict, tmp_path: Path) -> None:
    """train.run on the tiny latents with six bad samples put first in shard 0: one full epoch."""
    latents = tmp_path / "latents"
    shutil.copytree(tiny_data["latents"], latents)
    ok = np.zeros(SHAPE, np.float16)
    nan = ok.copy()
    nan[0, 0, 0] = np.nan
    _prepend(
        latents / "train-000000.tar",
        [
            ("nocap.latent.npy", _npy(ok)),
            *_latent("long", ok, b"x" * 1001),
            *_latent("shape", np.zeros((4, 4, 4), np.float16)),
            *_latent("dtype", np.zeros(SHAPE, np.float32)),
            *_latent("nan", nan),
            ("bad.latent.npy", b"junk"),
            ("bad.txt", b"caption"),
        ],
    )
    expected = {
        "caption_too_long": 1,
        "decode_error": 1,
        "latent_dtype": 1,
        "latent_nonfinite": 1,
        "latent_shape": 1,
        "missing_caption": 1,
    }
    total = json.loads((latents / "train.json").read_text())["total"]
    data = {**tiny_data, "latents": latents}
    out = tmp_path / "run"
    cfg = compose_config(
        "train", tiny_overrides(data, out, f"data.batch_size={total // 3}", "trainer.max_steps=3")
    )
    train.run(cfg)
    assert json.loads((out / "data_skipped_rank0.json").read_text()) == expected
    report = json.loads((out / "data_bad_shards_rank0.json").read_text())
    assert report["shards"] == {str(latents / "train-000000.tar"): expected}
    assert report["samples_read"] == total // 3 * 3 + 6 and report["skipped"] == 6
    rows = list(csv.DictReader(open(out / "csv" / "metrics.csv")))
    last = {k: v for r in rows for k, v in r.items() if v}
    assert {k: float(v) for k, v in last.items() if k.startswith("data/")} == {
        f"data/skipped_{k}": float(n) for k, n in expected.items()
    }

    stop = tmp_path / "stop"
    cfg = compose_config(
        "train",
        tiny_overrides(
            data,
            stop,
            f"data.batch_size={total // 3}",
            "trainer.max_steps=3",
            "data.max_bad_fraction=0.01",
            "data.bad_fraction_min_samples=1",
        ),
    )
    with pytest.raises(
        RuntimeError, match=r"over data\.max_bad_fraction=0\.01: worst shards .*train-000000\.tar \(6: "
    ):
        train.run(cfg)
    assert json.loads((stop / "data_bad_shards_rank0.json").read_text())["skipped"] == 6


def test_damage_of_a_shard_split_between_ranks_counts_once(tmp_path: Path) -> None:
    """Exact mode splits a lone shard into stride pieces, one per rank, and each rank reads it whole: its
    shard-level damage counts only for the piece of offset 0, as each bad sample counts only for its owner."""
    urls = _write_defect_shards(tmp_path)[0]
    for url, reason in ((urls[2], "truncated_shard"), (urls[1], "corrupt_shard")):
        totals: dict[str, int] = {}
        for rank in range(2):
            ds = ShardDataset(
                [url],
                "latents",
                batch_size=1,
                num_batches=2,
                shuffle=False,
                latent_shape=SHAPE,
                rank=rank,
                world_size=2,
                shard_counts=[5],
            )
            pieces = ds.plan(0).pieces[rank][0]
            assert [(p[1], p[2]) for p in pieces] == [(2, rank)]  # the shard is split, not given to one rank
            counter = SkipCounter()
            assert sum(s is not None for s in ds._samples(iter([pieces]), 0, counter)) >= 1
            for k, n in counter.as_dict().items():
                totals[k] = totals.get(k, 0) + n
        assert totals.get(reason) == 1, (url, totals)
