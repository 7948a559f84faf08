"""Bad input gets a one-line error that names the fix, or is skipped and counted — never lost silently."""

from __future__ import annotations

import csv
import io
import tarfile
from pathlib import Path

import pytest
import torch
from conftest import tiny_overrides

import train
from ldm.config_utils import compose_config
from ldm.instantiate import build as instantiate


def test_shard_pattern_matching_nothing(tiny_data: dict, tmp_path: Path) -> None:
    cfg = compose_config(
        "train",
        tiny_overrides(tiny_data, tmp_path / "r", "data.train_shards='/nowhere/train-{000000..000003}.tar'"),
    )
    with pytest.raises(
        FileNotFoundError, match=r"No shard matches '/nowhere/train-\{000000..000003\}.tar': check the path"
    ):
        train.run(cfg)


def test_channel_mismatch_between_autoencoder_and_net(tiny_data: dict, tmp_path: Path) -> None:
    cfg = compose_config("train", tiny_overrides(tiny_data, tmp_path / "r", "net.in_channels=3"))
    with pytest.raises(
        ValueError, match=r"autoencoder has 4 latent channels but the network takes 3: set net.in_channels=4"
    ):
        instantiate(cfg.model)


def test_context_dim_mismatch(tiny_data: dict, tmp_path: Path) -> None:
    cfg = compose_config("train", tiny_overrides(tiny_data, tmp_path / "r", "net.context_dim=256"))
    with pytest.raises(ValueError, match=r"set net.context_dim=384"):
        instantiate(cfg.model)


def test_resume_from_missing_checkpoint(tiny_data: dict, tmp_path: Path) -> None:
    cfg = compose_config(
        "train", tiny_overrides(tiny_data, tmp_path / "r", f"ckpt_path={tmp_path / 'missing.ckpt'}")
    )
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        train.run(cfg)


def test_latent_shards_from_another_autoencoder_are_refused(tiny_data: dict, tmp_path: Path) -> None:
    from ldm.autoencoder.kl import KLAutoencoder
    from ldm.autoencoder.loaders import save_kl_autoencoder

    other = tmp_path / "other_ae"
    torch.manual_seed(
        123
    )  # not the seed of tiny_data's autoencoder: the global RNG may sit at a fresh seed 0 here
    save_kl_autoencoder(
        KLAutoencoder(base_channels=8, channel_mult=(1, 2, 2), norm_groups=8, mid_attention=False),
        str(other),
        scale_factor=1.0,
    )
    cfg = compose_config(
        "train", tiny_overrides(tiny_data, tmp_path / "r", f"autoencoder.path={other}.safetensors")
    )
    with pytest.raises(
        ValueError,
        match="latent shards were made by autoencoder .*tiny_ae.* but the configured one is .*other_ae",
    ):
        train.run(cfg)


def add_to_tar(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "a") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_corrupt_image_and_missing_caption_are_counted_and_logged(tiny_data: dict, tmp_path: Path) -> None:
    """Training on image shards (encoding on the fly) with one undecodable image and one caption-less
    sample."""
    import shutil

    images = tmp_path / "images"
    shutil.copytree(tiny_data["images"], images)
    good_png = next(iter(tarfile.open(images / "train-000000.tar").getmembers())).name
    add_to_tar(
        images / "train-000000.tar",
        {
            "zz_bad.png": b"not a png at all",
            "zz_bad.txt": b"broken image",
            "zz_nocap.png": tarfile.open(images / "train-000000.tar").extractfile(good_png).read(),
        },
    )
    out = tmp_path / "r"
    cfg = compose_config(
        "train",
        tiny_overrides(
            tiny_data,
            out,
            "data.kind=images",
            f"data.train_shards='{images}/train-{{000000..000002}}.tar'",
            f"data.val_shards={images}/val-000000.tar",
            "data.train_samples=200",
            "data.batch_size=40",
            "trainer.max_steps=5",
            "data.shuffle_buffer=1",
            "data.mode=cycle",
        ),
    )
    train.run(cfg)
    rows = list(csv.DictReader(open(out / "csv" / "metrics.csv")))
    last = {k: v for r in rows for k, v in r.items() if v}
    assert float(last["data/skipped_decode_error"]) == 1.0
    assert float(last["data/skipped_missing_caption"]) == 1.0
    import json

    assert json.loads((out / "data_skipped_rank0.json").read_text()) == {
        "decode_error": 1,
        "missing_caption": 1,
    }
