"""Labelled emoji shards (class id ``cls`` per sample, class names in the index meta) and the sources' own
splits."""

from __future__ import annotations

import json
import logging
import tarfile
from io import BytesIO
from pathlib import Path

import pytest
import torch
from PIL import Image

import prepare
from ldm.config_utils import compose_config
from ldm.data import emoji as emoji_source
from ldm.data.datamodule import ShardDataModule
from ldm.data.emoji_labels import emoji_label, label_names
from ldm.data.folder import hash_split
from ldm.data.labels import read_label_names
from ldm.data.shard_dataset import ShardDataset
from ldm.data.shards import SkipCounter, read_index
from ldm.encode import encode_shards

APPLE, GRIN, THUMBS_MEDIUM, THUMBS = "\U0001f34e", "\U0001f600", "\U0001f44d\U0001f3fd", "\U0001f44d"


def test_vocabulary_is_sorted_fixed_and_sized() -> None:
    categories, subcategories = label_names("category"), label_names("subcategory")
    assert categories == sorted(categories) and len(categories) == 9 and "Component" not in categories
    assert subcategories == sorted(subcategories) and len(subcategories) == 99
    assert categories[emoji_label(APPLE, "category")] == "Food & Drink"
    assert subcategories[emoji_label(APPLE, "subcategory")] == "food-fruit"
    # a skin-tone variant is in its base emoji's class; flag: Sark (Emoji 16) is newer than the data
    assert emoji_label(THUMBS_MEDIUM, "subcategory") == emoji_label(THUMBS, "subcategory")
    assert emoji_label("\U0001f1e8\U0001f1f6", "category") is None
    with pytest.raises(ValueError, match="use one of category, subcategory"):
        label_names("group")


def test_unlabelled_emoji_are_skipped_counted_and_logged(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(emoji_source, "fully_qualified_emoji", lambda: [APPLE, GRIN, THUMBS])
    monkeypatch.setattr(
        emoji_source, "emoji_label", lambda e, level: None if e == GRIN else emoji_label(e, level)
    )
    counter = SkipCounter("emoji")
    with caplog.at_level(logging.INFO):
        samples = list(emoji_source.emoji_samples(size=8, counter=counter, labels="category"))
    names = [(s["__key__"], label_names("category")[s["cls"]]) for s in samples]
    assert names == [("00000", "Food & Drink"), ("00002", "People & Body")]
    assert counter.as_dict() == {"no_label": 1}
    assert any("reason=no_label" in r.getMessage() for r in caplog.records)
    assert any("skipped {'no_label': 1}" in r.getMessage() for r in caplog.records)


@pytest.fixture(scope="module")
def labelled(tiny_data: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first 45 emoji as labelled image shards (prepare.py emoji --labels category), encoded by the tiny
    AE."""
    from ldm.autoencoder.loaders import load_kl_autoencoder

    root = tmp_path_factory.mktemp("labelled")
    prepare.main(
        [
            "emoji",
            "--labels",
            "category",
            "--limit",
            "45",
            "--max-per-shard",
            "20",
            "--images-only",
            "--out",
            str(root),
        ]
    )
    ae = load_kl_autoencoder(str(tiny_data["ae"]))
    for prefix in ("train", "val"):
        pattern = ",".join(read_index(str(root / "images" / f"{prefix}.json"))["paths"])
        encode_shards(pattern, str(root / "latents"), prefix, ae, 32, 64, device="cpu")
    return root


def test_labelled_shards_carry_cls_and_the_class_names(labelled: Path) -> None:
    names = label_names("category")
    index = read_index(str(labelled / "images" / "train.json"))
    meta = index["meta"]
    assert meta["labels"] == names and meta["label_level"] == "category"
    assert sum(meta["label_counts"]) == index["total"] and len(meta["label_counts"]) == len(names)
    with tarfile.open(index["paths"][0]) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]
    first = min(k.split(".")[0] for k in members)
    caption = members[f"{first}.txt"].decode()
    assert int(members[f"{first}.cls"]) == emoji_label(_emoji_with_caption(caption), "category")
    latent_meta = read_index(str(labelled / "latents" / "train.json"))["meta"]
    assert latent_meta["labels"] == names and latent_meta["label_level"] == "category"
    for source in (
        labelled / "latents",
        labelled / "latents" / "val.json",
        latent_meta,
        str(labelled / "latents" / "train-{000000..000001}.tar"),
    ):
        assert read_label_names(source) == names


def test_batches_hold_cls_as_int64(labelled: Path) -> None:
    urls = read_index(str(labelled / "images" / "train.json"))["paths"]
    batch = next(iter(ShardDataset(urls, "images", batch_size=4, num_batches=1, image_size=8, shuffle=False)))
    assert batch["cls"].dtype == torch.int64 and batch["cls"].shape == (4,)
    dm = ShardDataModule(
        str(labelled / "latents" / "train-{000000..000001}.tar"), batch_size=5, num_workers=0
    )
    assert dm.label_names == label_names("category")
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["cls"].dtype == torch.int64 and batch["cls"].shape == (5,)
    assert 0 <= int(batch["cls"].min()) and int(batch["cls"].max()) < len(dm.label_names)


def test_read_label_names_without_labels_names_the_fix(tiny_data: dict) -> None:
    with pytest.raises(ValueError, match=r"prepare.py emoji --labels category\|subcategory"):
        read_label_names(tiny_data["latents"])


def test_experiment_num_classes_is_the_vocabulary_size() -> None:
    cfg = compose_config("train", ["experiment=emoji_labels"])
    assert cfg.conditioner.num_classes == len(label_names("category"))
    assert cfg.data.kind == "latents" and "emoji32_category" in cfg.data.train_shards


# ---------------------------------------------------------------- the sources' splits
def test_hash_split_is_seeded_stable_and_near_the_fraction() -> None:
    keys = [f"img_{i}" for i in range(2000)]
    held = [k for k in keys if hash_split(0.1, seed=0)(k)]
    assert 150 < len(held) < 250
    assert held == [k for k in keys if hash_split(0.1, seed=0)(k)]  # no state: the same keys every time
    assert held != [k for k in keys if hash_split(0.1, seed=1)(k)]
    assert not any(hash_split(0.0)(k) for k in keys)
    with pytest.raises(ValueError, match="--val-fraction"):
        hash_split(1.0)


def _png(colour: tuple[int, int, int]) -> bytes:
    buf = BytesIO()
    Image.new("RGB", (4, 4), colour).save(buf, format="PNG")
    return buf.getvalue()


def _keys(out: Path, prefix: str) -> list[str]:
    keys = []
    for path in read_index(str(out / f"{prefix}.json"))["paths"]:
        with tarfile.open(path) as tar:
            keys += sorted({m.name.split(".")[0] for m in tar.getmembers()})
    return keys


def test_prepare_images_splits_by_key_and_keeps_the_duplicate_check(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    for i in range(30):
        (src / f"img{i:02d}.png").write_bytes(_png((i, 0, 0)))
        (src / f"img{i:02d}.txt").write_text(f"image {i}")
    (src / "a" / "b.png").write_bytes(_png((0, 9, 0)))  # key a_b ...
    (src / "a" / "b.txt").write_text("first")
    (src / "a_b.png").write_bytes(_png((0, 0, 9)))  # ... and a_b again: skipped, counted
    (src / "a_b.txt").write_text("second")
    args = ["images", "--input", str(src), "--val-fraction", "0.2", "--split-seed", "3"]
    with caplog.at_level(logging.INFO):
        prepare.main([*args, "--out", str(tmp_path / "one")])
    train, val = _keys(tmp_path / "one", "train"), _keys(tmp_path / "one", "val")
    is_val = hash_split(0.2, seed=3)
    assert sorted(train + val) == sorted(["a_b", *(f"img{i:02d}" for i in range(30))])  # path keys, each once
    assert val and all(map(is_val, val)) and not any(map(is_val, train))
    assert any("duplicate_key" in r.getMessage() and "31 samples" in r.getMessage() for r in caplog.records)
    (src / "new.png").write_bytes(_png((1, 2, 3)))  # another image moves no existing key across the split
    (src / "new.txt").write_text("new")
    prepare.main([*args, "--out", str(tmp_path / "two")])
    assert set(val) <= set(_keys(tmp_path / "two", "val")) and set(train) <= set(
        _keys(tmp_path / "two", "train")
    )


def test_split_samples_takes_the_split_from_the_caller(tmp_path: Path) -> None:
    samples = [{"__key__": f"k{i}", "txt": "x", "cls": i % 2} for i in range(6)]
    counts = prepare.split_samples(
        iter(samples), str(tmp_path), 4, lambda key: key in ("k0", "k3"), labels=(["even", "odd"], "parity")
    )
    assert counts == {"train": 4, "val": 2}
    meta = json.loads((tmp_path / "val.json").read_text())["meta"]
    assert meta == {"labels": ["even", "odd"], "label_level": "parity", "label_counts": [1, 1]}
    assert read_index(str(tmp_path / "train.json"))["meta"]["label_counts"] == [2, 2]


def _emoji_with_caption(text: str) -> str:
    return next(e for e in emoji_source.fully_qualified_emoji() if emoji_source.caption(e) == text)
