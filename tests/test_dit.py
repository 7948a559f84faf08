"""Tests for the DiT backbone (ldm/nets/dit.py): shapes for any grid, zero init, positions, masks,
checkpointing, every objective and sampler, a tiny overfit and a train.py -> sample.py run with
``net=dit_tiny``."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, tiny_overrides
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image

import ldm.nets.dit as dit_module
from ldm.config_utils import compose_config
from ldm.nets import DIT_SIZES, DiT, build_dit
from ldm.nets.dit import sincos_pos_embed_2d

CTX = 16


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Tiny tensors: intra-op threads only contend on a shared two-core machine (10x slower steps with 2)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_dit(**kwargs: object) -> DiT:
    cfg: dict = dict(
        in_channels=4, out_channels=4, patch_size=2, hidden_size=32, depth=2, num_heads=4, context_dim=CTX
    )
    cfg.update(kwargs)
    return DiT(**cfg)


def perturbed(net: DiT, seed: int = 0) -> DiT:
    """Give every zero-initialised parameter random values so every branch (gates, tables, output) is live."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            if not p.any():
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return net


def inputs(b: int = 2, h: int = 8, w: int = 8, ctx_len: int = 5, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 4, h, w, generator=g)
    t = torch.rand(b, generator=g) * 999.0
    ctx = torch.randn(b, ctx_len, CTX, generator=g)
    return x, t, ctx


@pytest.mark.parametrize(
    "hw,patch", [((8, 8), 2), ((8, 12), 2), ((16, 8), 2), ((8, 8), 4), ((16, 8), 4), ((6, 10), 1)]
)
def test_output_shape_for_any_grid(hw: tuple[int, int], patch: int) -> None:
    torch.manual_seed(0)
    net = perturbed(tiny_dit(patch_size=patch, out_channels=3)).eval()
    x, t, ctx = inputs(h=hw[0], w=hw[1])
    out = net(x, t, ctx)
    assert out.shape == (2, 3, *hw) and torch.isfinite(out).all() and out.abs().mean() > 1e-3


def test_zero_output_at_init_and_unconditional() -> None:
    torch.manual_seed(0)
    x, t, ctx = inputs(h=8, w=12)
    assert torch.all(tiny_dit()(x, t, ctx) == 0)
    uncond = tiny_dit(context_dim=None)
    assert torch.all(uncond(x, t) == 0) and not any("cross" in k for k in uncond.state_dict())
    assert perturbed(uncond)(x, torch.tensor(5.0)).shape == x.shape  # scalar c_noise broadcasts


def numpy_2d_sincos(dim: int, gh: int, gw: int) -> np.ndarray:
    """MAE / DiT ``get_2d_sincos_pos_embed`` (facebookresearch/mae util/pos_embed.py), generalised to gh x
    gw."""

    def one_d(d: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid = np.meshgrid(np.arange(gw, dtype=np.float32), np.arange(gh, dtype=np.float32))  # w goes first
    grid = np.stack(grid, axis=0).reshape(2, 1, gh, gw)
    return np.concatenate([one_d(dim // 2, grid[0]), one_d(dim // 2, grid[1])], axis=1)


def test_pos_embed_matches_numpy_reference_and_is_used_for_the_input_grid(monkeypatch) -> None:
    ours = sincos_pos_embed_2d(32, 3, 5)
    np.testing.assert_allclose(ours.numpy(), numpy_2d_sincos(32, 3, 5), rtol=0, atol=1e-12)
    seen: list[tuple[int, int]] = []
    real = dit_module.sincos_pos_embed_2d
    monkeypatch.setattr(
        dit_module,
        "sincos_pos_embed_2d",
        lambda d, gh, gw, dev: seen.append((gh, gw)) or real(d, gh, gw, dev),
    )
    x, t, ctx = inputs(h=8, w=12)
    tiny_dit()(x, t, ctx)
    assert seen == [(4, 6)]


def test_padded_context_tokens_do_not_change_the_output() -> None:
    torch.manual_seed(0)
    net = perturbed(tiny_dit()).eval()
    x, t, ctx = inputs(ctx_len=6)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    out = net(x, t, ctx, mask)
    garbage = ctx.clone()
    garbage[~mask] = 100.0 * torch.randn(int((~mask).sum()), CTX)
    torch.testing.assert_close(net(x, t, garbage, mask), out, rtol=0, atol=1e-6)
    real_changed = ctx.clone()
    real_changed[:, 0] += 1.0
    assert (net(x, t, real_changed, mask) - out).abs().max() > 1e-4
    assert not torch.allclose(net(x, t, garbage), out)  # without the mask the padding is attended to
    empty = net(x, t, ctx, torch.zeros_like(mask))  # no real token: finite, not NaN
    assert torch.isfinite(empty).all()


def test_gradient_checkpointing_same_output_and_gradients(monkeypatch) -> None:
    torch.manual_seed(0)
    plain = perturbed(tiny_dit()).train()
    ckpt = copy.deepcopy(plain)
    ckpt.gradient_checkpointing = True
    calls = []
    real = dit_module.checkpoint
    monkeypatch.setattr(dit_module, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    x, t, ctx = inputs(h=8, w=12)
    outs = []
    for net in (plain, ckpt):
        out = net(x, t, ctx)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        outs.append(out.detach())
    assert len(calls) == 2  # one per block, only for the checkpointed net
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-6, atol=1e-7, msg=name)


def test_bad_config_errors_name_the_fix() -> None:
    net = tiny_dit(patch_size=4)
    x, t, ctx = inputs(h=8, w=10)
    with pytest.raises(ValueError, match=r"not divisible by net.patch_size=4.*smaller net.patch_size"):
        net(x, t, ctx)
    with pytest.raises(ValueError, match="set net.num_heads"):
        tiny_dit(num_heads=5)
    with pytest.raises(ValueError, match="set net.in_channels"):
        net(torch.randn(1, 3, 8, 8), t[:1], ctx[:1])
    with pytest.raises(ValueError, match="set net.context_dim"):
        net(torch.randn(1, 4, 8, 8), t[:1], torch.randn(1, 5, CTX + 1))
    with pytest.raises(ValueError, match="unknown DiT size 'dit_m2'.*dit_s2"):
        build_dit("dit_m2")


def test_size_registry_and_configs_agree() -> None:
    assert DIT_SIZES["dit_s2"] == {"depth": 12, "hidden_size": 384, "num_heads": 6, "patch_size": 2}
    assert DIT_SIZES["dit_xl2"] == {"depth": 28, "hidden_size": 1152, "num_heads": 16, "patch_size": 2}
    for name in ("dit_s2", "dit_b2"):
        cfg = OmegaConf.load(ROOT / "configs" / "net" / f"{name}.yaml")
        assert cfg._target_ == "ldm.nets.dit.DiT"
        assert {k: cfg[k] for k in DIT_SIZES[name]} == DIT_SIZES[name]


@pytest.mark.parametrize(
    "diffusion,sampler",
    [
        ("ddpm_linear_eps", "ddim"),
        ("ddpm_scaled_linear_v", "dpmpp_2m"),
        ("edm", "heun"),
        ("rectified_flow", "flow_euler"),
    ],
)
def test_every_objective_trains_and_samples(diffusion: str, sampler: str) -> None:
    from ldm.sampling.grids import sampling_sigmas

    cfg = compose_config("train", ["net=dit_tiny", f"diffusion={diffusion}", f"sampler={sampler}"])
    torch.manual_seed(0)
    denoiser = instantiate(cfg.model.denoiser)
    loss_fn = instantiate(cfg.diffusion.loss)
    x0, _, _ = inputs()
    ctx, mask = torch.randn(2, 5, 384), torch.ones(2, 5, dtype=torch.bool)
    loss = loss_fn(denoiser.net, x0, ctx, mask, generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss) and denoiser.net.final_layer.linear.weight.grad.abs().sum() > 0
    perturbed(denoiser.net).eval()
    sigmas = sampling_sigmas(denoiser.schedule, 3)
    x = torch.randn(2, 4, 8, 12) * denoiser.schedule.init_noise_scale(float(sigmas[0]))
    with torch.no_grad():
        out = instantiate(cfg.sampler)(denoiser, x, sigmas, extra_args={"context": ctx, "context_mask": mask})
    assert out.shape == (2, 4, 8, 12) and torch.isfinite(out).all()


def test_tiny_dit_overfits_a_few_latents() -> None:
    """Memorise the eps of 4 fixed noisy latents: the loss drops by a large factor in 100 Adam steps."""
    torch.manual_seed(0)
    net = DiT(
        in_channels=4, out_channels=4, patch_size=2, hidden_size=64, depth=2, num_heads=4, context_dim=CTX
    )
    x0, t, ctx = inputs(b=4, seed=1)
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(2))
    alpha_bar = torch.cos(t / 1000 * torch.pi / 2)[:, None, None, None] ** 2
    x_t = alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * eps  # DDPM eq. 4
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=0.0)
    losses = []
    for _ in range(100):
        loss = torch.nn.functional.mse_loss(net(x_t, t, ctx), eps)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(eps.pow(2).mean().item())  # zero output at init
    assert losses[-1] < losses[0] / 100, losses[::10]  # ~1e-4 of the start in practice


def test_train_py_and_sample_py_with_dit_tiny(tiny_data: dict, tmp_path: Path) -> None:
    import sample
    import train
    from ldm.lit.checkpoint_io import load_checkpoint_file

    out = tmp_path / "run"
    overrides = ["net=dit_tiny" if o == "net=unet_tiny" else o for o in tiny_overrides(tiny_data, out)]
    summary = train.run(compose_config("train", overrides))
    assert summary["global_step"] == 6
    ckpt_path = out / "checkpoints" / "last.ckpt"
    ckpt = load_checkpoint_file(ckpt_path)
    assert ckpt["ldm_config"]["model"]["denoiser"]["net"]["_target_"] == "ldm.nets.dit.DiT"
    assert any(k.startswith("denoiser.net.blocks.1.cross_attn.") for k in ckpt["state_dict"])
    cfg = compose_config(
        "sample",
        [
            f"ckpt={ckpt_path}",
            f"out_dir={tmp_path / 's'}",
            "prompt=red apple",
            "num_images=2",
            "steps=4",
            "cfg_scale=3",
            "seed=7",
        ],
    )
    records = sample.run(cfg)
    assert len(records) == 2
    image = np.asarray(Image.open(tmp_path / "s" / records[0]["file"]))
    assert image.shape == (32, 32, 3) and image.std() > 0
