"""Tests for ldm.autoencoder: the KL autoencoder, its loss, the frozen wrapper and the loaders."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from ldm.autoencoder import (
    SHIPPED_AUTOENCODER,
    DiagonalGaussian,
    FrozenAutoencoder,
    KLAutoencoder,
    KLAutoencoderLoss,
    kl_autoencoder_from_checkpoint,
    latent_stats,
    load_diffusers_autoencoder,
    load_kl_autoencoder,
    psnr,
    save_kl_autoencoder,
    weights_sha256,
)

TINY = dict(base_channels=8, channel_mult=(1, 2, 2), num_res_blocks=1, z_channels=4, norm_groups=4)


@pytest.fixture
def tiny_ae() -> KLAutoencoder:
    torch.manual_seed(0)
    return KLAutoencoder(**TINY)


def _images(batch: int = 2, size: int = 32, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, size, size, generator=g) * 2 - 1  # (B, 3, H, W) in [-1, 1]


# --- KLAutoencoder --------------------------------------------------------------------------------


def test_shapes_f4(tiny_ae: KLAutoencoder) -> None:
    x = _images()
    posterior = tiny_ae.encode(x)
    assert posterior.mean.shape == (2, 4, 8, 8)
    assert tiny_ae.downsample_factor == 4 and tiny_ae.latent_channels == 4
    assert tiny_ae.decode(posterior.sample()).shape == x.shape
    recon, post = tiny_ae(x, sample=False)
    assert recon.shape == x.shape and torch.equal(post.mode(), post.mean)


def test_default_is_f4_and_f8_variant() -> None:
    assert KLAutoencoder().downsample_factor == 4
    ae = KLAutoencoder(base_channels=8, channel_mult=(1, 1, 2, 2), norm_groups=4, z_channels=3)
    assert ae.encode(_images(1)).mean.shape == (1, 3, 4, 4)


def test_bad_input_raises_clear_errors(tiny_ae: KLAutoencoder) -> None:
    with pytest.raises(ValueError, match="divisible by 4"):
        tiny_ae.encode(torch.zeros(1, 3, 30, 32))
    with pytest.raises(ValueError, match="latent_channels"):
        tiny_ae.decode(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="norm_groups"):
        KLAutoencoder(base_channels=12, norm_groups=8)


def test_sample_reproducible_with_generator(tiny_ae: KLAutoencoder) -> None:
    post = tiny_ae.encode(_images())
    a = post.sample(torch.Generator().manual_seed(3))
    b = post.sample(torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and not torch.equal(a, post.mode())


def test_config_round_trip_is_json(tiny_ae: KLAutoencoder) -> None:
    cfg = json.loads(json.dumps(tiny_ae.config()))
    assert cfg["channel_mult"] == [1, 2, 2]
    rebuilt = KLAutoencoder(**cfg)
    assert rebuilt.state_dict().keys() == tiny_ae.state_dict().keys()


# --- DiagonalGaussian -----------------------------------------------------------------------------


def test_kl_matches_torch_distributions() -> None:
    g = torch.Generator().manual_seed(0)
    mean, logvar = torch.randn(3, 4, 5, 5, generator=g), torch.randn(3, 4, 5, 5, generator=g)
    ours = DiagonalGaussian(mean, logvar).kl()
    ref = kl_divergence(Normal(mean, torch.exp(0.5 * logvar)), Normal(0.0, 1.0)).flatten(1).sum(1)
    assert ours.shape == (3,)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    zero = DiagonalGaussian(torch.zeros(2, 1, 2, 2), torch.zeros(2, 1, 2, 2)).kl()
    assert torch.equal(zero, torch.zeros(2))


def test_logvar_clamped() -> None:
    post = DiagonalGaussian(torch.zeros(1, 1, 1, 2), torch.tensor([[[[-100.0, 100.0]]]]))
    assert post.logvar.flatten().tolist() == [-30.0, 20.0]


def test_sample_statistics() -> None:
    mean, logvar = torch.full((1, 1, 200, 200), 2.0), torch.full((1, 1, 200, 200), math.log(0.25))
    z = DiagonalGaussian(mean, logvar).sample(torch.Generator().manual_seed(0))
    assert abs(z.mean().item() - 2.0) < 0.01 and abs(z.std().item() - 0.5) < 0.01


# --- loss ------------------------------------------------------------------------------------------


def test_psnr_hand_computation() -> None:
    x = torch.zeros(2, 1, 2, 2)
    y = torch.zeros(2, 1, 2, 2)
    y[0, 0, 0, 0] = 1.0  # mse = 1/4 -> 10 log10(4 / 0.25) = 10 log10(16)
    y[1] = 0.5  # mse = 0.25 as well; range 2
    expected = 10 * math.log10(16)
    torch.testing.assert_close(psnr(x, y), torch.tensor([expected, expected]))
    torch.testing.assert_close(psnr(x, y, data_range=1.0), torch.tensor([10 * math.log10(4)] * 2))
    assert torch.isfinite(psnr(x, x)).all()


def test_loss_values_and_gradient(tiny_ae: KLAutoencoder) -> None:
    x = _images()
    recon, post = tiny_ae(x, generator=torch.Generator().manual_seed(0))
    loss_fn = KLAutoencoderLoss(kl_weight=1e-2, pixel_loss="l1")
    loss, logs = loss_fn(x, recon, post)
    rec = (recon - x).abs().mean()
    kl = post.kl().mean()
    torch.testing.assert_close(loss, rec + 1e-2 * kl / (3 * 32 * 32))
    torch.testing.assert_close(logs["rec"], rec.detach())
    torch.testing.assert_close(logs["psnr"], psnr(x, recon).mean().detach())
    assert set(logs) == {"loss", "rec", "kl", "psnr"} and not logs["kl"].requires_grad
    loss.backward()
    grads = [p.grad for p in tiny_ae.parameters()]
    assert all(g is not None for g in grads)
    assert tiny_ae.encoder.conv_in.weight.grad.abs().sum() > 0  # KL + rec reach the encoder


def test_loss_l2_and_bad_name(tiny_ae: KLAutoencoder) -> None:
    x = _images()
    recon, post = tiny_ae(x, sample=False)
    loss, _ = KLAutoencoderLoss(kl_weight=0.0, pixel_loss="l2")(x, recon, post)
    torch.testing.assert_close(loss, (recon - x).pow(2).mean())
    with pytest.raises(ValueError, match="pixel_loss"):
        KLAutoencoderLoss(pixel_loss="lpips")


def test_loss_decreases_when_training() -> None:
    torch.manual_seed(0)
    ae = KLAutoencoder(base_channels=8, channel_mult=(1, 2), norm_groups=4, mid_attention=False)
    coarse = _images(4, 4)  # smooth images: 4x4 noise upsampled to 16x16
    x = torch.nn.functional.interpolate(coarse, size=16, mode="bilinear", align_corners=False)
    loss_fn = KLAutoencoderLoss()
    opt = torch.optim.Adam(ae.parameters(), lr=3e-3)
    first = None
    for _ in range(60):
        loss, logs = loss_fn(x, *ae(x))
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = logs["rec"].item() if first is None else first
    assert logs["rec"].item() < 0.5 * first


# --- save / load -----------------------------------------------------------------------------------


def test_save_load_round_trip(tiny_ae: KLAutoencoder, tmp_path: Path) -> None:
    path = tmp_path / "ae"
    save_kl_autoencoder(tiny_ae, str(path), scale_factor=0.5, shift_factor=0.1, extra={"steps": 7})
    assert (tmp_path / "ae.safetensors").is_file() and not list(tmp_path.glob("*.tmp"))
    meta = json.loads((tmp_path / "ae.json").read_text())
    assert meta["extra"] == {"steps": 7} and meta["config"] == tiny_ae.config()
    frozen = load_kl_autoencoder(str(tmp_path / "ae.safetensors"))
    x = _images()
    tiny_ae.eval()
    with torch.no_grad():
        mode = tiny_ae.encode(x).mode()
        assert torch.equal(frozen.encode(x), (mode - 0.1) * 0.5)
        assert torch.equal(frozen.decode(frozen.encode(x)), tiny_ae.decode((mode - 0.1) * 0.5 / 0.5 + 0.1))
    ident = frozen.identity
    assert ident == {
        "name": "ae",
        "sha256": weights_sha256(tiny_ae),
        "scale_factor": 0.5,
        "shift_factor": 0.1,
        "latent_channels": 4,
        "downsample_factor": 4,
    }
    override = load_kl_autoencoder(str(path), scale_factor=2.0, shift_factor=0.0)
    assert override.scale_factor == 2.0 and override.shift_factor == 0.0


def test_load_strict_missing_and_extra_keys(tiny_ae: KLAutoencoder, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    save_kl_autoencoder(tiny_ae, str(tmp_path / "ae.safetensors"), scale_factor=1.0)
    weights = tmp_path / "ae.safetensors"
    state = load_file(str(weights))
    state.pop("post_quant_conv.bias")
    save_file(state, str(weights))
    with pytest.raises(ValueError, match="missing.*post_quant_conv.bias"):
        load_kl_autoencoder(str(weights))
    state = load_file(str(weights)) | {"post_quant_conv.bias": torch.zeros(4), "extra.weight": torch.zeros(1)}
    save_file(state, str(weights))
    with pytest.raises(ValueError, match="unexpected.*extra.weight"):
        load_kl_autoencoder(str(weights))


def test_load_detects_changed_weights(tiny_ae: KLAutoencoder, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    save_kl_autoencoder(tiny_ae, str(tmp_path / "ae"), scale_factor=1.0)
    state = load_file(str(tmp_path / "ae.safetensors"))
    state["post_quant_conv.bias"] += 1.0
    save_file(state, str(tmp_path / "ae.safetensors"))
    with pytest.raises(ValueError, match="sha256"):
        load_kl_autoencoder(str(tmp_path / "ae"))


def test_missing_path_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(FileNotFoundError, match="nope.safetensors not found: check the path"):
        load_kl_autoencoder(str(tmp_path / "nope.safetensors"))
    from ldm.autoencoder import loaders

    monkeypatch.setitem(loaders._ALIASES, SHIPPED_AUTOENCODER, tmp_path / "weights" / "x.safetensors")
    with pytest.raises(FileNotFoundError, match="save_kl_autoencoder") as err:
        load_kl_autoencoder()
    assert "\n" not in str(err.value)


def test_from_lightning_checkpoint(tiny_ae: KLAutoencoder, tmp_path: Path) -> None:
    cfg = {"_target_": "ldm.autoencoder.KLAutoencoder", **tiny_ae.config()}
    state = {f"model.{k}": v for k, v in tiny_ae.state_dict().items()} | {"loss.dummy": torch.zeros(1)}
    ckpt = {"state_dict": state, "ldm_config": {"model": {"model": cfg}}, "epoch": 3}
    torch.save(ckpt, tmp_path / "last.ckpt")
    model = kl_autoencoder_from_checkpoint(str(tmp_path / "last.ckpt"))
    assert weights_sha256(model) == weights_sha256(tiny_ae)
    with pytest.raises(FileNotFoundError, match="not found"):
        kl_autoencoder_from_checkpoint(str(tmp_path / "missing.ckpt"))


# --- FrozenAutoencoder -----------------------------------------------------------------------------


def _frozen(ae: KLAutoencoder, scale: float = 0.7, shift: float = 0.2) -> FrozenAutoencoder:
    return FrozenAutoencoder(
        ae,
        scale_factor=scale,
        shift_factor=shift,
        latent_channels=ae.latent_channels,
        downsample_factor=ae.downsample_factor,
        identity={"name": "tiny", "sha256": weights_sha256(ae)},
    )


def test_frozen_no_grad_and_eval(tiny_ae: KLAutoencoder) -> None:
    frozen = _frozen(tiny_ae)
    frozen.train()
    assert not frozen.training and not tiny_ae.training
    assert all(not m.training for m in frozen.modules())
    assert not any(p.requires_grad for p in frozen.parameters())
    x = _images().requires_grad_(True)
    z = frozen.encode(x)
    assert not z.requires_grad and not frozen.decode(z).requires_grad
    head = torch.nn.Linear(2, 2)
    wrapper = torch.nn.ModuleDict({"ae": frozen, "head": head})
    trainable = [p for p in wrapper.parameters() if p.requires_grad]
    assert len(trainable) == 2  # only the head's weight and bias would reach an optimizer


def test_frozen_scale_shift_maths(tiny_ae: KLAutoencoder) -> None:
    frozen = _frozen(tiny_ae, scale=0.7, shift=0.2)
    x = _images()
    with torch.no_grad():
        mode = tiny_ae.encode(x).mode()
        z = frozen.encode(x)
        torch.testing.assert_close(z, (mode - 0.2) * 0.7)
        torch.testing.assert_close(frozen.encode_unscaled(x), mode)
        # decode(encode(x)) == the raw model's reconstruction through the posterior mode
        torch.testing.assert_close(frozen.decode(z), tiny_ae.decode(mode), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(frozen.decode(z * 0 + 0.7), tiny_ae.decode(torch.full_like(z, 1.2)))
    with pytest.raises(ValueError, match="latent_channels"):
        frozen.decode(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="scale_factor"):
        _frozen(tiny_ae, scale=0.0)


def test_latent_stats(tiny_ae: KLAutoencoder) -> None:
    frozen = _frozen(tiny_ae)
    batches = [_images(2, seed=s) for s in range(3)]
    stats = latent_stats(frozen, batches)
    with torch.no_grad():
        z = torch.cat([tiny_ae.encode(b).mode() for b in batches]).double()  # (6, 4, 8, 8)
    assert stats["count"] == z.numel()
    torch.testing.assert_close(torch.tensor(stats["channel_mean"], dtype=torch.float64), z.mean((0, 2, 3)))
    torch.testing.assert_close(
        torch.tensor(stats["channel_std"], dtype=torch.float64), z.transpose(0, 1).flatten(1).std(1)
    )
    assert stats["std"] == pytest.approx(z.std().item(), rel=1e-9)
    assert stats["scale_factor"] == pytest.approx(1 / z.std().item(), rel=1e-9)
    with pytest.raises(ValueError, match="at least one"):
        latent_stats(frozen, [])


# --- diffusers parity ------------------------------------------------------------------------------


def _tiny_diffusers_vae(shift: float | None = None):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        norm_num_groups=8,
        latent_channels=4,
        scaling_factor=0.3,
        shift_factor=shift,
    ).eval()


@pytest.mark.parametrize("subfolder", [None, "vae"])
def test_diffusers_parity(tmp_path: Path, subfolder: str | None) -> None:
    vae = _tiny_diffusers_vae()
    vae.save_pretrained(tmp_path / subfolder if subfolder else tmp_path)
    frozen = load_diffusers_autoencoder(str(tmp_path), subfolder=subfolder)
    assert frozen.latent_channels == 4 and frozen.downsample_factor == 2
    assert frozen.scale_factor == pytest.approx(0.3) and frozen.shift_factor == 0.0
    assert frozen.identity["sha256"] == weights_sha256(vae)
    assert not any(p.requires_grad for p in frozen.parameters())
    x = _images(2, 16)
    with torch.no_grad():
        ref_z = vae.encode(x).latent_dist.mode() * 0.3
        z = frozen.encode(x)
        torch.testing.assert_close(z, ref_z)
        torch.testing.assert_close(frozen.decode(z), vae.decode(ref_z / 0.3).sample)


def test_diffusers_shift_and_override(tmp_path: Path) -> None:
    vae = _tiny_diffusers_vae(shift=0.1)
    vae.save_pretrained(tmp_path)
    frozen = load_diffusers_autoencoder(str(tmp_path))
    x = _images(1, 16)
    with torch.no_grad():
        torch.testing.assert_close(frozen.encode(x), (vae.encode(x).latent_dist.mode() - 0.1) * 0.3)
    custom = load_diffusers_autoencoder(str(tmp_path), scale_factor=2.0, shift_factor=0.0)
    assert (custom.scale_factor, custom.shift_factor) == (2.0, 0.0)


def test_diffusers_missing_dir(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not found"):
        load_diffusers_autoencoder(str(tmp_path / "nope"))
    _tiny_diffusers_vae().save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="subfolder"):
        load_diffusers_autoencoder(str(tmp_path), subfolder="vae")
