"""Tests for the conditional latent-diffusion UNet (ldm/nets)."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers.models.embeddings import get_timestep_embedding

import ldm.nets.unet as unet_module
from ldm.nets import UNet
from ldm.nets.layers import Attention, timestep_embedding

CTX_DIM = 16


def tiny_unet(**kwargs: object) -> UNet:
    cfg: dict = dict(
        in_channels=4,
        out_channels=4,
        model_channels=32,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_resolutions=(1, 2),
        num_heads=4,
        context_dim=CTX_DIM,
        norm_groups=8,
    )
    cfg.update(kwargs)
    return UNet(**cfg)


def perturbed(net: UNet, seed: int = 0) -> UNet:
    """Give every zero-initialised parameter random values so each branch affects the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            if not p.any():
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return net


def inputs(b: int = 2, seed: int = 0, ctx_len: int = 5) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 4, 8, 8, generator=g)
    t = torch.rand(b, generator=g) * 999.0  # fractional timesteps
    ctx = torch.randn(b, ctx_len, CTX_DIM, generator=g)
    return x, t, ctx


def test_output_shape_and_zero_init() -> None:
    torch.manual_seed(0)
    net = tiny_unet(out_channels=3).eval()
    x, t, ctx = inputs()
    out = net(x, t, ctx)
    assert out.shape == (2, 3, 8, 8)
    assert torch.all(out == 0)  # zero-initialised final conv
    out = perturbed(net)(x, t, ctx)
    assert out.abs().mean() > 1e-3
    assert torch.isfinite(out).all()


def test_output_shape_three_levels_two_res_blocks() -> None:
    torch.manual_seed(0)
    net = tiny_unet(channel_mult=(1, 2, 2), num_res_blocks=2, attention_resolutions=(2,)).eval()
    x = torch.randn(1, 4, 8, 12)
    out = perturbed(net)(x, torch.tensor([10.0]), torch.randn(1, 3, CTX_DIM))
    assert out.shape == (1, 4, 8, 12)


@pytest.mark.parametrize("dim", [32, 33, 320])
def test_timestep_embedding_matches_diffusers(dim: int) -> None:
    t = torch.tensor([0.0, 1.0, 17.5, 500.25, 999.0])
    ours = timestep_embedding(t, dim)
    ref = get_timestep_embedding(t, dim, flip_sin_to_cos=True, downscale_freq_shift=0)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)


def test_timestep_changes_output() -> None:
    torch.manual_seed(0)
    net = perturbed(tiny_unet()).eval()
    x, _, ctx = inputs(b=1)
    a = net(x, torch.tensor([10.0]), ctx)
    b = net(x, torch.tensor([10.5]), ctx)
    assert (a - b).abs().max() > 1e-5


def reference_attention(attn: Attention, x: torch.Tensor, ctx: torch.Tensor, mask: torch.Tensor | None):
    """Hand-written multi-head softmax(Q K^T / sqrt(d)) V."""
    h = attn.num_heads
    q, k, v = attn.to_q(x), attn.to_k(ctx), attn.to_v(ctx)  # (B, N, C), (B, L, C), (B, L, C)
    b, n, c = q.shape
    d = c // h
    q = q.view(b, n, h, d).permute(0, 2, 1, 3)
    k = k.view(b, -1, h, d).permute(0, 2, 1, 3)
    v = v.view(b, -1, h, d).permute(0, 2, 1, 3)
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)  # (B, h, N, L)
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    out = scores.softmax(-1) @ v  # (B, h, N, d)
    return attn.to_out(out.permute(0, 2, 1, 3).reshape(b, n, c))


@pytest.mark.parametrize("cross", [True, False])
def test_attention_matches_hand_written_softmax(cross: bool) -> None:
    torch.manual_seed(0)
    attn = Attention(32, CTX_DIM if cross else None, num_heads=4, dropout=0.0)
    x = torch.randn(2, 10, 32)
    if cross:
        ctx = torch.randn(2, 6, CTX_DIM)
        mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
        out = attn(x, ctx, mask)
        ref = reference_attention(attn, x, ctx, mask)
        # without the mask the result differs, so the masking is really exercised
        assert (attn(x, ctx) - ref).abs().max() > 1e-4
    else:
        out = attn(x)
        ref = reference_attention(attn, x, x, None)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_masked_tokens_have_no_effect() -> None:
    torch.manual_seed(0)
    net = perturbed(tiny_unet()).eval()
    x, t, ctx = inputs(b=2, ctx_len=6)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    ctx2 = ctx.clone()
    ctx2[~mask] = 100.0 * torch.randn(int((~mask).sum()), CTX_DIM)
    with torch.no_grad():
        ref = net(x, t, ctx, mask)
        torch.testing.assert_close(net(x, t, ctx2, mask), ref, rtol=1e-5, atol=1e-5)
        # integer (tokenizer-style 1/0) masks are accepted and mean the same
        torch.testing.assert_close(net(x, t, ctx2, mask.long()), ref, rtol=1e-5, atol=1e-5)
        # controls: the masked values matter without the mask, and real tokens matter with it
        assert (net(x, t, ctx2) - net(x, t, ctx)).abs().max() > 1e-3
        ctx3 = ctx.clone()
        ctx3[0, 0] += 1.0
        assert (net(x, t, ctx3, mask) - ref).abs().max() > 1e-4


def test_fully_masked_context_is_finite_and_ignored() -> None:
    torch.manual_seed(0)
    net = perturbed(tiny_unet()).eval()
    x, t, ctx = inputs(b=1)
    mask = torch.zeros(1, ctx.shape[1], dtype=torch.bool)
    with torch.no_grad():
        a = net(x, t, ctx, mask)
        b = net(x, t, torch.randn_like(ctx), mask)
    assert torch.isfinite(a).all()
    torch.testing.assert_close(a, b)


def test_per_sample_independence() -> None:
    torch.manual_seed(0)
    net = perturbed(tiny_unet()).eval()
    x, t, ctx = inputs(b=3, ctx_len=4)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool)
    with torch.no_grad():
        batched = net(x, t, ctx, mask)
        for i in range(3):
            single = net(x[i : i + 1], t[i : i + 1], ctx[i : i + 1], mask[i : i + 1])
            torch.testing.assert_close(batched[i : i + 1], single, rtol=1e-4, atol=1e-5)
    assert (batched[0] - batched[1]).abs().max() > 1e-4


def test_gradient_checkpointing_equivalence(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real_checkpoint = unet_module.checkpoint

    def counting_checkpoint(*args: object, **kwargs: object):
        calls.append(kwargs.get("use_reentrant"))
        return real_checkpoint(*args, **kwargs)

    monkeypatch.setattr(unet_module, "checkpoint", counting_checkpoint)
    torch.manual_seed(0)
    plain = perturbed(tiny_unet(dropout=0.1)).train()
    ckpt = tiny_unet(dropout=0.1, gradient_checkpointing=True).train()
    ckpt.load_state_dict(plain.state_dict())
    x, t, ctx = inputs(b=2)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    results = []
    for net in (plain, ckpt):
        xi = x.clone().requires_grad_(True)
        torch.manual_seed(123)  # same dropout masks in both runs
        out = net(xi, t, ctx, mask)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        results.append((out.detach(), xi.grad, {n: p.grad for n, p in net.named_parameters()}))
    assert calls and all(r is False for r in calls)  # used, non-reentrant
    (o1, gx1, g1), (o2, gx2, g2) = results
    torch.testing.assert_close(o2, o1)
    torch.testing.assert_close(gx2, gx1)
    for name, grad in g1.items():
        assert grad is not None and grad.abs().sum() > 0, f"no gradient reaches {name}"
        torch.testing.assert_close(g2[name], grad, msg=lambda m, n=name: f"{n}: {m}")
    # no checkpointing in eval mode
    calls.clear()
    with torch.no_grad():
        ckpt.eval()(x, t, ctx, mask)
    assert not calls


def test_unconditional_mode() -> None:
    torch.manual_seed(0)
    net = perturbed(tiny_unet(context_dim=None)).eval()
    assert all(m.attn2 is None for m in net.modules() if hasattr(m, "attn2"))
    assert not any("attn2" in n for n, _ in net.named_parameters())
    x, t, _ = inputs()
    out = net(x, t)
    assert out.shape == x.shape and out.abs().mean() > 1e-3
    with pytest.raises(ValueError, match="unconditional"):
        net(x, t, torch.randn(2, 3, CTX_DIM))


def test_channel_mismatch_error() -> None:
    net = tiny_unet()
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(ValueError, match=r"3 channels.*in_channels=4.*net\.in_channels.*latent channels"):
        net(x, torch.tensor([1.0]), torch.randn(1, 2, CTX_DIM))


def test_spatial_size_error() -> None:
    net = tiny_unet(channel_mult=(1, 2, 2))
    x = torch.randn(1, 4, 8, 6)
    with pytest.raises(ValueError, match=r"not divisible by 4.*multiple of 4"):
        net(x, torch.tensor([1.0]), torch.randn(1, 2, CTX_DIM))


def test_context_dim_error() -> None:
    net = tiny_unet()
    x = torch.randn(1, 4, 8, 8)
    with pytest.raises(ValueError, match=r"last dim is 7.*context_dim=16.*net\.context_dim.*conditioner"):
        net(x, torch.tensor([1.0]), torch.randn(1, 2, 7))
    with pytest.raises(ValueError, match="no context"):
        net(x, torch.tensor([1.0]))
