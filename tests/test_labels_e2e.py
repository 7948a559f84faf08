"""Class-conditional end to end through the entry points: labelled shards -> train.py (label dropout through
the multi-conditioner, vocabulary from index.json into the checkpoint) -> sample.py label=<name> -> the grid
by label; text + label in one model; a checkpoint in the pre-multi-conditioner layout samples
byte-identically."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import tiny_overrides

import sample
import train
from ldm.conditioning.multi import sampling_inputs
from ldm.config_utils import compose_config
from ldm.data.emoji import emoji_samples
from ldm.data.shards import write_shards
from ldm.lit.checkpoint_io import load_checkpoint_file
from ldm.lit.loading import load_for_sampling

NAMES = ["fruit", "heart", "face"]


@pytest.fixture(scope="module")
def labelled_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 emoji in one labelled image shard set: KEY.cls = i mod 3, index.json meta "labels" = NAMES."""
    out = tmp_path_factory.mktemp("labelled")
    samples = [{**s, "cls": i % 3} for i, s in enumerate(emoji_samples(size=32, limit=24))]
    write_shards(samples, str(out), "train", meta={"labels": NAMES, "image_size": 32})
    return out


def train_run(tiny_data: dict, shards: Path, out: Path, conditioner: str, *extra: str) -> Path:
    cfg = compose_config(
        "train",
        tiny_overrides(
            tiny_data,
            out,
            f"conditioner={conditioner}",
            "data.kind=images",
            f"data.train_shards={shards}/train-000000.tar",
            "data.val_shards=null",
            "data.batch_size=8",
            "trainer.max_steps=2",
            "check_autoencoder=0",
            "callbacks.sample_grid.steps=2",
            *extra,
        ),
    )
    assert train.run(cfg)["global_step"] == 2
    return out / "checkpoints" / "last.ckpt"


def sample_run(ckpt: Path, out: Path, *extra: str) -> list[dict]:
    return sample.run(
        compose_config(
            "sample",
            [
                f"ckpt={ckpt}",
                f"out_dir={out}",
                "num_images=2",
                "steps=3",
                "cfg_scale=3",
                "sampler=ddim",
                *extra,
            ],
        )
    )


def test_text_and_label_model_trains_and_samples_by_name(
    tiny_data: dict, labelled_shards: Path, tmp_path: Path
) -> None:
    ckpt = train_run(tiny_data, labelled_shards, tmp_path / "run", "text_and_label")
    stored = load_checkpoint_file(ckpt)
    node = stored["ldm_config"]["model"]["conditioner"]["conditioners"][1]
    assert node["labels"] == NAMES and node["num_classes"] == 3  # the vocabulary travels with the checkpoint
    keys = [k for k in stored["state_dict"] if k.startswith("conditioner.")]
    assert keys == [
        "conditioner.conditioners.1.embedding.weight"
    ]  # the trained labels only, no frozen MiniLM
    assert (tmp_path / "run" / "samples" / "step_000002.png").is_file()  # the grid by label
    records = sample_run(ckpt, tmp_path / "a", "prompt=red apple", "label=heart")
    assert [r["label"] for r in records] == ["heart", "heart"] and records[0]["prompt"] == "red apple"
    by_id = sample_run(ckpt, tmp_path / "b", "prompt=red apple", "label=1")
    assert (tmp_path / "a" / records[0]["file"]).read_bytes() == (
        tmp_path / "b" / by_id[0]["file"]
    ).read_bytes()
    # names resolve through the stored vocabulary, and the label reaches the cond dict (after 2 steps its
    # effect on 8-bit pixels is below rounding: the nets' output layers start at zero)
    model = load_for_sampling(ckpt, True, torch.device("cpu"))
    heart, face = (
        sampling_inputs(model.conditioner, ["red apple"], [name], [32, 32]) for name in ("heart", "face")
    )
    assert heart["cls"].tolist() == [1] and face["cls"].tolist() == [2]
    assert not torch.equal(model.conditioner(heart)["context"], model.conditioner(face)["context"])
    with pytest.raises(ValueError, match="not in the model's vocabulary"):
        sample_run(ckpt, tmp_path / "d", "prompt=red apple", "label=car")


def test_label_model_and_its_pre_multi_conditioner_checkpoint_sample_alike(
    tiny_data: dict, labelled_shards: Path, tmp_path: Path
) -> None:
    ckpt = train_run(
        tiny_data, labelled_shards, tmp_path / "run", "class_label", "conditioner.num_classes=null"
    )
    records = sample_run(ckpt, tmp_path / "new", "label=[fruit,face]")
    # the layout written before conditioning became a list: same state-dict keys
    # (conditioner.embedding.weight), a config without labels/output/vector_dim/concat_channels; labels are
    # then given by id
    old = load_checkpoint_file(ckpt)
    assert "conditioner.embedding.weight" in old["state_dict"]
    model = old["ldm_config"]["model"]
    for key in ("labels", "output"):
        del model["conditioner"][key]
    for key in ("vector_dim", "concat_channels"):
        model["denoiser"]["net"].pop(key, None)
    torch.save(old, tmp_path / "old.ckpt")
    old_records = sample_run(tmp_path / "old.ckpt", tmp_path / "old", "label=[0,2]")
    for new, before in zip(records, old_records, strict=True):
        assert (tmp_path / "new" / new["file"]).read_bytes() == (
            tmp_path / "old" / before["file"]
        ).read_bytes()
