"""Per-channel latent normalisation: the training shards' channel statistics, carried by the checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_overrides
from hydra_utils import compose_config

import train
from ldm.autoencoder.latent_norm import LatentNorm, latent_norm_from_stats
from ldm.lit.checkpoint_io import load_checkpoint_file
from ldm.lit.loading import load_for_sampling


def test_identity_is_exact_and_stats_round_trip() -> None:
    norm = LatentNorm(4)
    z = torch.randn(3, 4, 8, 8) * 3 + 1
    assert norm.is_identity
    assert torch.equal(norm.normalize(z), z) and torch.equal(norm.denormalize(z), z)
    norm.set_stats([1.0, 0.0, -2.0, 0.5], [0.5, 2.0, 1.0, 0.25])
    x = norm.normalize(z)
    assert torch.allclose(x[:, 0], (z[:, 0] - 1.0) / 0.5) and torch.allclose(x[:, 3], (z[:, 3] - 0.5) / 0.25)
    assert torch.allclose(norm.denormalize(x), z, atol=1e-6)
    # data with these statistics comes out standardised per channel
    data = torch.randn(4096, 4, 2, 2, dtype=torch.float64) * torch.tensor([0.5, 2.0, 1.0, 0.25]).view(
        1, 4, 1, 1
    )
    data = data + torch.tensor([1.0, 0.0, -2.0, 0.5]).view(1, 4, 1, 1)
    out = norm.normalize(data)
    assert out.mean((0, 2, 3)).abs().max() < 0.05 and (out.std((0, 2, 3)) - 1).abs().max() < 0.05


def test_spec_errors_name_the_fix() -> None:
    assert latent_norm_from_stats("none", {}) is None
    with pytest.raises(ValueError, match="prepare.py latents"):
        latent_norm_from_stats("per_channel", {"autoencoder": {}})
    with pytest.raises(ValueError, match="none, per_channel"):
        latent_norm_from_stats("channel", {})
    with pytest.raises(ValueError, match="4 means and stds"):
        LatentNorm(4).set_stats([0.0] * 3, [1.0] * 3)
    with pytest.raises(ValueError, match="> 0"):
        LatentNorm(2).set_stats([0.0, 0.0], [1.0, 0.0])


def test_per_channel_run_normalises_and_sampling_undoes_it(tiny_data: dict, tmp_path: Path) -> None:
    out = tmp_path / "run"
    cfg = compose_config("train", tiny_overrides(tiny_data, out, "model.latent_norm=per_channel"))
    train.run(cfg)
    index = json.loads((tiny_data["latents"] / "train.json").read_text())
    stats = index["meta"]["latent_stats"]
    ckpt = load_checkpoint_file(out / "checkpoints" / "last.ckpt")
    assert torch.allclose(
        ckpt["state_dict"]["latent_norm.mean"], torch.tensor(stats["channel_mean"], dtype=torch.float64)
    )
    assert torch.allclose(
        ckpt["state_dict"]["latent_norm.std"], torch.tensor(stats["channel_std"], dtype=torch.float64)
    )

    model = load_for_sampling(out / "checkpoints" / "last.ckpt", use_ema=True, device=torch.device("cpu"))
    x = torch.randn(2, 4, 8, 8)
    mean = torch.tensor(stats["channel_mean"]).view(1, 4, 1, 1)
    std = torch.tensor(stats["channel_std"]).view(1, 4, 1, 1)
    expected = model.autoencoder.decode(x * std + mean)
    assert torch.allclose(model.decode_samples(x), expected, atol=1e-5)

    # a checkpoint from before latent_norm (no buffers) samples with the identity norm
    del ckpt["state_dict"]["latent_norm.mean"], ckpt["state_dict"]["latent_norm.std"]
    old = tmp_path / "old.ckpt"
    torch.save(ckpt, old)
    legacy = load_for_sampling(old, use_ema=True, device=torch.device("cpu"))
    assert legacy.latent_norm.is_identity
    assert torch.equal(legacy.decode_samples(x), legacy.autoencoder.decode(x))


def test_explicit_stats(tiny_data: dict, tmp_path: Path) -> None:
    cfg = compose_config(
        "train",
        tiny_overrides(
            tiny_data, tmp_path / "a", "model.latent_norm={mean: [1, 2, 3, 4], std: [1, 1, 2, 2]}"
        ),
    )
    from hydra.utils import instantiate

    module = instantiate(cfg.model)
    assert module.latent_norm.mean.tolist() == [1, 2, 3, 4]
    z = torch.ones(1, 4, 1, 1)
    assert module.latents({"latent": z}).flatten().tolist() == [0.0, -1.0, -1.0, -1.5]


def test_per_channel_on_image_shards_uses_the_first_images_latents(tiny_data: dict, tmp_path: Path) -> None:
    from ldm.autoencoder.loaders import load_kl_autoencoder
    from ldm.reconstruction import encoded_channel_stats

    images = tiny_data["images"]
    out = tmp_path / "run"
    shards = f"{images}/train-{{000000..000002}}.tar"
    cfg = compose_config(
        "train",
        tiny_overrides(
            tiny_data,
            out,
            "data.kind=images",
            f"data.train_shards='{shards}'",
            f"data.val_shards={images}/val-000000.tar",
            "trainer.max_steps=2",
            "model.latent_norm=per_channel",
            "check_autoencoder=0",
        ),
    )
    train.run(cfg)
    state = load_checkpoint_file(out / "checkpoints" / "last.ckpt")["state_dict"]
    ae = load_kl_autoencoder(str(tiny_data["ae"]))
    stats = encoded_channel_stats(shards, ae, 32)
    assert stats["count"] == 114  # every training image (fewer than 512; 6 of the 120 are validation)
    # the latent shards of the same images hold the same statistics (fp16 storage aside)
    index = json.loads((tiny_data["latents"] / "train.json").read_text())["meta"]["latent_stats"]
    assert torch.allclose(torch.tensor(stats["channel_mean"]), torch.tensor(index["channel_mean"]), atol=2e-3)
    assert torch.allclose(state["latent_norm.std"], torch.tensor(stats["channel_std"], dtype=torch.float64))
