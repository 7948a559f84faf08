"""Stage 1: the KL autoencoder trains through train.py, reports PSNR, exports; the shipped weights reconstruct
emoji."""

from __future__ import annotations

import csv
from pathlib import Path

import torch
from conftest import tiny_overrides

import prepare
import train
from ldm.autoencoder.loaders import kl_autoencoder_from_checkpoint, load_kl_autoencoder
from ldm.autoencoder.loss import psnr
from ldm.config_utils import compose_config


def test_autoencoder_experiment_trains_reports_psnr_and_exports(tiny_data: dict, tmp_path: Path) -> None:
    out = tmp_path / "ae_run"
    images = tiny_data["images"]
    overrides = [
        o
        for o in tiny_overrides(tiny_data, out)
        if not o.startswith(("callbacks.", "data.", "net", "autoencoder"))
    ]
    cfg = compose_config(
        "train",
        [
            "experiment=autoencoder_emoji",
            *overrides,
            f"data.train_shards='{images}/train-{{000000..000002}}.tar'",
            f"data.val_shards={images}/val-000000.tar",
            "data.batch_size=16",
            "model.model.base_channels=8",
            "model.model.norm_groups=8",
            "model.model.mid_attention=false",
            "trainer.max_steps=8",
            "trainer.check_val_every_n_epoch=1",
            "callbacks.throughput.window=2",
        ],
    )
    summary = train.run(cfg)
    assert summary["global_step"] == 8
    rows = list(csv.DictReader(open(out / "csv" / "metrics.csv")))
    psnrs = [float(r["val/psnr"]) for r in rows if r.get("val/psnr")]
    assert psnrs and all(0 < p < 60 for p in psnrs)

    ckpt = out / "checkpoints" / "last.ckpt"
    export = tmp_path / "exported" / "my_ae"
    prepare.main(
        [
            "export-autoencoder",
            "--ckpt",
            str(ckpt),
            "--shards",
            f"{images}/train-{{000000..000002}}.tar",
            "--out",
            str(export),
        ]
    )
    frozen = load_kl_autoencoder(str(export) + ".safetensors")  # strict
    model = kl_autoencoder_from_checkpoint(str(ckpt)).eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        z_ref = model.encode(x).mode()
        torch.testing.assert_close(frozen.encode(x), z_ref * frozen.identity["scale_factor"])
        torch.testing.assert_close(frozen.decode(frozen.encode(x)), model.decode(z_ref), rtol=1e-4, atol=1e-5)
    # the scale factor makes the training latents unit-variance (Rombach et al. 2022, sec. 4.3.2)
    assert 0.0 < frozen.identity["scale_factor"] < 100.0


def test_shipped_autoencoder_reconstructs_held_out_emoji() -> None:
    from ldm.data.decode import decode_image
    from ldm.data.emoji import emoji_samples, is_validation_key

    ae = load_kl_autoencoder()  # strict load of ldm/autoencoder/weights/emoji_kl_f4.safetensors
    assert ae.latent_channels == 4 and ae.downsample_factor == 4
    x = torch.stack(
        [decode_image(s["png"], 32) for s in emoji_samples(size=32) if is_validation_key(s["__key__"])]
    )
    assert len(x) > 150  # the fixed held-out split: every 20th emoji, never seen in training
    with torch.no_grad():
        z = ae.encode(x)
        recon = ae.decode(z).clamp(-1, 1)
    assert z.shape == (len(x), 4, 8, 8)
    assert 0.5 < float(z.std()) < 2.0  # the stored scale factor gives roughly unit-variance latents
    assert float(psnr(x, recon).mean()) > PSNR_FLOOR


PSNR_FLOOR = 27.0  # the shipped weights measure 28.2 dB on this split (README, "Train the autoencoder")
