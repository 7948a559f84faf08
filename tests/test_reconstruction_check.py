"""The autoencoder's reconstruction is measured on the user's own images before latents are made, and a poor
one (the shipped emoji autoencoder on dark images) is warned about loudly, naming the fix."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import prepare
from ldm.autoencoder.loaders import SHIPPED_AUTOENCODER, load_kl_autoencoder
from ldm.reconstruction import reconstruction_check


def test_shipped_autoencoder_passes_on_emoji(tiny_data: dict) -> None:
    ae = load_kl_autoencoder(SHIPPED_AUTOENCODER)
    result = reconstruction_check(f"{tiny_data['images']}/val-000000.tar", ae, 32, num_images=16)
    assert (
        result["ok"] and result["psnr_db"] > 22 and result["n"] == 6
    )  # 23.8 dB on the tiny val shard's 6 emoji


def test_dark_images_are_warned_about_with_the_fix(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = tmp_path / "dark"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):  # dark photo-like textures: what the emoji autoencoder never saw
        pixels = (rng.random((32, 32, 3)) ** 3 * 60).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i:02d}.png")
        (folder / f"img{i:02d}.txt").write_text(f"dark texture {i}")
    prepare.main(["images", "--input", str(folder), "--out", str(tmp_path / "images"), "--prefix", "train"])
    with caplog.at_level(logging.INFO):
        prepare.main(
            [
                "latents",
                "--shards",
                str(tmp_path / "images" / "train-000000.tar"),
                "--out",
                str(tmp_path / "latents"),
                "--prefix",
                "train",
                "--image-size",
                "32",
            ]
        )
    report = json.loads((tmp_path / "latents" / "reconstruction_train.json").read_text())
    assert report["n"] == 12 and not report["ok"] and report["psnr_db"] < 20
    warning = next(r.getMessage() for r in caplog.records if "PSNR" in r.getMessage())
    assert "only" in warning and "train a stage-1 autoencoder" in warning and "diffusers" in warning
