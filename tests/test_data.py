"""ldm.data: emoji source, folder source, shard writing, the WebDataset pipeline and the DataModule."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from ldm.data import (
    ShardDataModule,
    ShardDataset,
    SkipCounter,
    emoji_samples,
    expand_urls,
    folder_samples,
    is_validation_key,
    read_index,
    write_shards,
)
from ldm.data.emoji import caption, render


def _png(array: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt)
    return buf.getvalue()


def _image_samples(n: int, size: int = 8, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    arrays = rng.integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)
    return [
        {"__key__": f"{i:05d}", "png": _png(a), "txt": f"caption {i}", "cls": i % 3}
        for i, a in enumerate(arrays)
    ]


def _latent_samples(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [
        {"__key__": f"{i:05d}", "latent": rng.standard_normal((4, 2, 2)).astype(np.float16), "txt": f"c{i}"}
        for i in range(n)
    ]


def _read_all(dataset: ShardDataset, num_workers: int = 0) -> list[dict]:
    return list(DataLoader(dataset, batch_size=None, num_workers=num_workers))


# ---------------------------------------------------------------- emoji


def test_emoji_captions_keys_and_colour_images() -> None:
    samples = list(emoji_samples(size=32, limit=40))
    assert len(samples) == 40
    assert [s["__key__"] for s in samples] == [f"{i:05d}" for i in range(40)]
    for s in samples:
        assert set(s) == {"__key__", "png", "txt"}
        assert s["txt"] and ":" not in s["txt"][:1] and "_" not in s["txt"]
        image = np.asarray(Image.open(io.BytesIO(s["png"])))
        assert image.shape == (32, 32, 3)
        assert (image < 200).any(), f"{s['txt']} rendered blank"
    # The first 40 (by code point) are keycaps (blue), "!!" (red) and black symbols: colour must survive.
    colourful = 0
    for s in samples:
        pixels = np.asarray(Image.open(io.BytesIO(s["png"]))).reshape(-1, 3).astype(int)
        colourful += bool(((pixels.max(axis=1) - pixels.min(axis=1)) > 60).any())
    assert colourful >= 12
    # A white border around centred glyphs.
    first = np.asarray(Image.open(io.BytesIO(samples[0]["png"])))
    assert first[0].min() > 240 and first[:, 0].min() > 240


def test_emoji_caption_format_and_split() -> None:
    assert caption("\U0001f34e") == "red apple"
    assert caption("\U0001f575\U0001f3fe\u200d\u2640\ufe0f") == "woman detective: medium-dark skin tone"
    assert caption("\U0001f1f0\U0001f1fc") == "flag: Kuwait"
    assert is_validation_key("00020") and is_validation_key("00000") and not is_validation_key("00021")
    assert render("\u0378") is None  # no glyph -> blank -> skipped
    red_apple = np.asarray(render("\U0001f34e", 32)).astype(int)
    assert ((red_apple[..., 0] - red_apple[..., 1]) > 80).sum() > 50  # mostly red


# ---------------------------------------------------------------- shards


def test_image_shards_round_trip_exact(tmp_path: Path) -> None:
    samples = _image_samples(10)
    paths = write_shards(samples, str(tmp_path), prefix="img", max_per_shard=4, meta={"source": "test"})
    assert [Path(p).name for p in paths] == ["img-000000.tar", "img-000001.tar", "img-000002.tar"]
    assert not list(tmp_path.glob("*.tmp"))
    index = read_index(str(tmp_path / "img.json"))
    assert index["counts"] == [4, 4, 2] and index["total"] == 10 and index["meta"] == {"source": "test"}
    ds = ShardDataset(paths, kind="images", batch_size=5, num_batches=2, image_size=8, shuffle=False)
    batches = _read_all(ds)
    assert len(batches) == 2
    assert batches[0]["image"].shape == (5, 3, 8, 8) and batches[0]["image"].dtype == torch.float32
    images = torch.cat([b["image"] for b in batches])
    keys = sum((b["__key__"] for b in batches), [])
    assert keys == [s["__key__"] for s in samples]
    for image, s in zip(images, samples, strict=True):
        expected = torch.from_numpy(np.array(Image.open(io.BytesIO(s["png"])))).permute(2, 0, 1) / 127.5 - 1
        assert torch.equal(image, expected.float())
    assert sum((b["txt"] for b in batches), []) == [s["txt"] for s in samples]
    assert torch.cat([b["cls"] for b in batches]).tolist() == [s["cls"] for s in samples]
    assert all(b["skipped"] == {} for b in batches)


def test_latent_shards_round_trip_exact(tmp_path: Path) -> None:
    samples = _latent_samples(6)
    paths = write_shards(samples, str(tmp_path), prefix="lat", max_per_shard=100, meta={"ae": "abc"})
    ds = ShardDataset(
        paths, kind="latents", batch_size=3, num_batches=2, shuffle=False, latent_shape=(4, 2, 2)
    )
    batches = _read_all(ds)
    latents = torch.cat([b["latent"] for b in batches])  # (6, 4, 2, 2)
    assert latents.dtype == torch.float32 and latents.shape == (6, 4, 2, 2)
    expected = torch.from_numpy(np.stack([s["latent"] for s in samples]).astype(np.float32))
    assert torch.equal(latents, expected)


def test_image_resize_short_side_and_centre_crop(tmp_path: Path) -> None:
    wide = np.zeros((16, 32, 3), np.uint8)
    wide[:, 8:24] = 255  # a white centre band exactly as wide as the crop
    paths = write_shards([{"__key__": "a", "jpg": _png(wide), "txt": "x"}], str(tmp_path))
    batch = _read_all(ShardDataset(paths, kind="images", batch_size=1, num_batches=1, image_size=16))[0]
    assert batch["image"].shape == (1, 3, 16, 16)
    assert batch["image"][0, :, :, 2:-2].min() > 0.9  # the band fills the crop


# ---------------------------------------------------------------- urls


def test_expand_urls_braces_commas_and_errors(tmp_path: Path) -> None:
    for i in range(3):
        (tmp_path / f"part-{i:05d}.tar").write_bytes(b"")
    (tmp_path / "extra.tar").write_bytes(b"")
    found = expand_urls(f"{tmp_path}/part-{{00000..00004}}.tar")  # 3 of 5 exist
    assert found == [f"{tmp_path}/part-{i:05d}.tar" for i in range(3)]
    both = expand_urls(f"{tmp_path}/part-{{00000,00002}}.tar,{tmp_path}/extra.tar")
    assert [Path(u).name for u in both] == ["part-00000.tar", "part-00002.tar", "extra.tar"]
    assert expand_urls("pipe:cat x-{0..1}.tar") == ["pipe:cat x-0.tar", "pipe:cat x-1.tar"]
    with pytest.raises(FileNotFoundError, match=r"No shard matches .*train-\{000000\.\.000003\}\.tar"):
        expand_urls(f"{tmp_path}/missing-{{0..3}}.tar")


# ---------------------------------------------------------------- folder


def test_folder_source_counts_bad_pairs(tmp_path: Path) -> None:
    image = np.full((8, 8, 3), 200, np.uint8)
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.png").write_bytes(_png(image))
    (tmp_path / "a.txt").write_text("an a\n")
    (tmp_path / "sub" / "b.jpeg").write_bytes(_png(image, "JPEG"))
    (tmp_path / "sub" / "b.txt").write_text("a b")
    (tmp_path / "corrupt.png").write_bytes(b"not an image")
    (tmp_path / "corrupt.txt").write_text("broken")
    (tmp_path / "nocap.webp").write_bytes(_png(image, "WEBP"))
    counter = SkipCounter("folder")
    samples = list(folder_samples(str(tmp_path), counter))
    assert counter.as_dict() == {"decode_error": 1, "missing_caption": 1}
    assert [(s["__key__"], s["txt"]) for s in samples] == [("a", "an a"), ("sub_b", "a b")]
    assert "png" in samples[0] and "jpg" in samples[1]
    assert len(write_shards(samples, str(tmp_path / "out"))) == 1


# ---------------------------------------------------------------- bad samples


def test_corrupt_samples_are_skipped_and_reported(tmp_path: Path) -> None:
    samples = _image_samples(8)
    samples[3]["png"] = b"garbage"
    del samples[5]["txt"]
    paths = write_shards(samples, str(tmp_path))
    batches = _read_all(
        ShardDataset(paths, kind="images", batch_size=2, num_batches=3, image_size=8, shuffle=False)
    )
    assert len(batches) == 3
    total: dict[str, int] = {}
    for b in batches:
        for reason, n in b["skipped"].items():
            total[reason] = total.get(reason, 0) + n
    assert total == {"decode_error": 1, "missing_caption": 1}
    assert sum((b["__key__"] for b in batches), []) == ["00000", "00001", "00002", "00004", "00006", "00007"]


def test_bad_latents_are_skipped(tmp_path: Path) -> None:
    samples = _latent_samples(6)
    samples[1]["latent"] = np.full((4, 2, 2), np.nan, np.float16)
    samples[2]["latent"] = np.zeros((2, 2), np.float16)
    samples[3]["latent"] = np.zeros((4, 2, 2), np.int32)
    samples[4] = {"__key__": "00004", "txt": "no latent"}
    paths = write_shards(samples, str(tmp_path))
    ds = ShardDataset(
        paths, kind="latents", batch_size=2, num_batches=1, shuffle=False, latent_shape=(4, 2, 2)
    )
    batch = _read_all(ds)[0]
    assert batch["__key__"] == ["00000", "00005"]
    assert batch["skipped"] == {
        "latent_nonfinite": 1,
        "latent_shape": 1,
        "latent_dtype": 1,
        "missing_latent": 1,
    }


# ---------------------------------------------------------------- distribution


@pytest.mark.parametrize("num_workers", [0, 2])
def test_ranks_read_disjoint_shards_with_equal_batch_counts(tmp_path: Path, num_workers: int) -> None:
    paths = write_shards(_image_samples(37, size=4), str(tmp_path), max_per_shard=8)  # 8, 8, 8, 8, 5
    assert len(paths) == 5
    keys_by_rank = []
    for rank in range(2):
        ds = ShardDataset(
            paths, "images", batch_size=4, num_batches=6, image_size=4, rank=rank, world_size=2, mode="cycle"
        )
        batches = _read_all(ds, num_workers)
        assert len(batches) == 6  # rank 1 has 16 samples for 24 slots: it cycles its shards
        keys_by_rank.append({k for b in batches for k in b["__key__"]})
    shard_of = {f"{i:05d}": i // 8 for i in range(37)}
    assert {shard_of[k] for k in keys_by_rank[0]} <= {0, 2, 4}
    assert {shard_of[k] for k in keys_by_rank[1]} <= {1, 3}
    assert len(keys_by_rank[1]) == 16  # every sample of rank 1 was seen


def test_fewer_shards_than_consumers_splits_samples(tmp_path: Path) -> None:
    paths = write_shards(_image_samples(24, size=4), str(tmp_path), max_per_shard=8)  # 3 shards, 4 consumers
    keys = []
    for rank in range(2):
        ds = ShardDataset(
            paths, "images", batch_size=3, num_batches=4, image_size=4, rank=rank, world_size=2, mode="cycle"
        )
        batches = _read_all(ds, num_workers=2)
        assert len(batches) == 4
        keys += [k for b in batches for k in b["__key__"]]
    assert sorted(keys) == [f"{i:05d}" for i in range(24)]  # disjoint and complete


def test_same_seed_same_order_new_epoch_new_order(tmp_path: Path) -> None:
    paths = write_shards(_image_samples(40, size=4), str(tmp_path), max_per_shard=10)

    def order(epoch: int, seed: int = 0, workers: int = 0) -> list[str]:
        ds = ShardDataset(
            paths, "images", batch_size=4, num_batches=10, image_size=4, seed=seed, shuffle_buffer=16
        )
        ds.set_epoch(epoch)
        return [k for b in _read_all(ds, workers) for k in b["__key__"]]

    first = order(0)
    assert first == order(0) and sorted(first) == [f"{i:05d}" for i in range(40)]
    assert order(1) != first and order(0, seed=1) != first
    assert order(0, workers=2) == order(0, workers=2)


# ---------------------------------------------------------------- datamodule


def test_datamodule_counts_from_index(tmp_path: Path) -> None:
    write_shards(_latent_samples(20), str(tmp_path), prefix="train", max_per_shard=5, meta={"ae": "tiny"})
    write_shards(_latent_samples(6, seed=1), str(tmp_path), prefix="val", max_per_shard=5)
    dm = ShardDataModule(
        f"{tmp_path}/train-{{000000..000003}}.tar",
        f"{tmp_path}/val-{{000000..000001}}.tar",
        batch_size=4,
        latent_shape=[4, 2, 2],
    )
    assert dm.train_samples == 20 and dm.val_samples == 6 and dm.index_meta == {"ae": "tiny"}
    dm.setup("fit")
    train = list(dm.train_dataloader())
    assert len(train) == 5 and train[0]["latent"].shape == (4, 4, 2, 2)
    dm.set_epoch(1)  # without a Trainer; under one train_dataloader sets the epoch (and a resumed position)
    assert dm.train_dataset.epoch == 1
    dm.trainer = object()
    with pytest.raises(RuntimeError, match="without a Trainer"):
        dm.set_epoch(2)
    dm.trainer = None
    val = [k for b in dm.val_dataloader() for k in b["__key__"]]
    assert (
        val == [k for b in dm.val_dataloader() for k in b["__key__"]] == ["00000", "00001", "00002", "00003"]
    )
    (tmp_path / "train.json").unlink()
    with pytest.raises(FileNotFoundError, match="train_samples="):
        ShardDataModule(f"{tmp_path}/train-000000.tar")
    assert (
        ShardDataModule(f"{tmp_path}/train-000000.tar", train_samples=5, latent_shape=[4, 2, 2]).train_samples
        == 5
    )
    assert json.loads((tmp_path / "val.json").read_text())["total"] == 6


def test_latent_shape_is_required_not_taken_from_the_first_sample(tmp_path: Path) -> None:
    """No shape in the index meta nor given: a one-line error naming data.latent_shape, not a shape fixed by
    whichever sample a worker reads first; with it in the meta, ShardDataset reads it from there."""
    paths = write_shards(_latent_samples(4), str(tmp_path), prefix="train", max_per_shard=2, meta={"ae": "x"})
    with pytest.raises(ValueError, match=r"data\.latent_shape=\[4,32,32\]") as err:
        ShardDataset(paths, "latents", batch_size=2, num_batches=1)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match=r"data\.latent_shape="):
        ShardDataModule(f"{tmp_path}/train-{{000000..000001}}.tar", batch_size=2)
    write_shards(
        _latent_samples(4), str(tmp_path), prefix="train", max_per_shard=2, meta={"latent_shape": [4, 2, 2]}
    )
    ds = ShardDataset(paths, "latents", batch_size=2, num_batches=2, shuffle=False)
    assert ds.decoder.latent_shape == (4, 2, 2) and len(_read_all(ds)) == 2


def test_a_failed_write_closes_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """TarWriter does not close a file object it was given: write_shard must, or every failed shard leaks an
    fd (until the garbage collector finds it)."""
    from ldm.data import shards

    opened: list = []

    class Sink(shards._ShardSink):
        def __init__(self, path: Path) -> None:
            super().__init__(path)
            opened.append(self.stream)

    def samples() -> Iterator[dict]:
        yield {"__key__": "a", "txt": "fine"}
        raise RuntimeError("the encoder failed")

    monkeypatch.setattr(shards, "_ShardSink", Sink)
    with pytest.raises(RuntimeError, match="the encoder failed"):
        shards.write_shard(samples(), tmp_path / "x-000000.tar")
    with pytest.raises(RuntimeError, match="the encoder failed"):
        shards.write_shards(samples(), str(tmp_path), prefix="y")
    assert len(opened) == 2 and all(f.closed for f in opened)
    assert not list(tmp_path.iterdir())  # no shard, no .tmp
