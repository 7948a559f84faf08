"""The exact fast paths of ``ldm.nets.layers``, each against the plain computation it replaces.

- The cross-attention key/value cache of sampling (``cross_attention_cache``): outputs unchanged, the context
  projected once per sampling run instead of once per step, and never a stale entry (a changed or new
  context, grad mode, leaving the block).
- The fused GEGLU projection (``_GatedProjection``): the same output and gradients as value * gelu(gate) ->
  proj_out, in float32 and under bfloat16 autocast, with a third fewer saved activations in the UNet."""

from __future__ import annotations

import contextlib
import functools

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import ldm.generate
from ldm.diffusion.denoiser import Denoiser
from ldm.diffusion.schedules import DiscreteSchedule
from ldm.generate import generate
from ldm.nets.compile import compile_backbone
from ldm.nets.dit import DiT
from ldm.nets.layers import Attention, GEGLUFeedForward, cross_attention_cache
from ldm.nets.unet import UNet
from ldm.sampling.grids import sampling_sigmas
from ldm.sampling.registry import SAMPLERS


def unet() -> UNet:
    torch.manual_seed(0)
    net = UNet(
        model_channels=32, channel_mult=(1, 2), attention_resolutions=(1, 2), num_heads=2, context_dim=24
    )
    with torch.no_grad():
        for p in net.parameters():
            if not p.any():
                p.normal_(0, 0.05)  # zero-initialised layers would hide the attention from the output
    return net.eval()


def count_kv_projections(net: nn.Module) -> list[int]:
    """A one-element counter, raised by every to_k call of a cross-attention layer."""
    calls = [0]
    for m in net.modules():
        if isinstance(m, Attention) and m.is_cross:
            m.to_k.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def inputs(batch: int = 3) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(batch, 4, 8, 8, generator=g), torch.randn(batch, 5, 24, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)[:batch]
    return x, torch.tensor([10.0, 500.0, 990.0])[:batch], ctx, mask


@pytest.mark.parametrize("backbone", ["unet", "dit"])
@torch.no_grad()
def test_cached_steps_equal_uncached_and_project_the_context_once(backbone: str) -> None:
    net = unet() if backbone == "unet" else DiT(hidden_size=32, depth=2, num_heads=2, context_dim=24).eval()
    for p in net.parameters():
        if not p.any():
            p.normal_(0, 0.05)
    x, t, ctx, mask = inputs()
    calls = count_kv_projections(net)
    layers = sum(isinstance(m, Attention) and m.is_cross for m in net.modules())
    assert layers >= 2
    plain = [net(x, t * s, context=ctx, context_mask=mask) for s in (1.0, 0.5, 0.25)]
    assert calls[0] == 3 * layers
    calls[0] = 0
    with cross_attention_cache(net):
        cached = [net(x, t * s, context=ctx, context_mask=mask) for s in (1.0, 0.5, 0.25)]
    assert calls[0] == layers  # once per layer for the whole run, not once per step
    for a, b in zip(plain, cached, strict=True):
        assert torch.equal(a, b)  # the same keys, values and mask: bit for bit
    assert all(m.kv_cache is None for m in net.modules() if isinstance(m, Attention))


@torch.no_grad()
def test_an_all_true_mask_is_dropped_and_a_changed_context_is_projected_again() -> None:
    net = unet()
    x, t, ctx, _ = inputs()
    full = torch.ones(3, 5, dtype=torch.bool)
    reference = net(x, t, context=ctx, context_mask=full)
    calls = count_kv_projections(net)
    with cross_attention_cache(net):
        torch.testing.assert_close(net(x, t, context=ctx, context_mask=full), reference, rtol=0, atol=1e-6)
        ctx.mul_(2.0)  # changed in place: its version moves on
        changed = net(x, t, context=ctx, context_mask=full)
        first = calls[0]
        other = ctx.clone()  # equal values, another tensor: projected, and the dead entry dropped
        del ctx
        net(x, t, context=other, context_mask=full)
        sizes = {len(m.kv_cache) for m in net.modules() if isinstance(m, Attention) and m.is_cross}
    torch.testing.assert_close(changed, net(x, t, context=other, context_mask=full), rtol=0, atol=1e-6)
    assert not torch.allclose(changed, reference)
    layers = sum(isinstance(m, Attention) and m.is_cross for m in net.modules())
    assert first == 2 * layers  # the first context, then the changed one
    assert calls[0] == 4 * layers  # + the new tensor in the block + the uncached call after it
    assert sizes == {1}


def test_no_cache_while_gradients_are_recorded() -> None:
    net = unet().train()
    x, t, ctx, mask = inputs()
    calls = count_kv_projections(net)
    with cross_attention_cache(net):
        for _ in range(2):
            net(x, t, context=ctx, context_mask=mask).square().mean().backward()
    layers = sum(isinstance(m, Attention) and m.is_cross for m in net.modules())
    assert calls[0] == 2 * layers
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)


def test_generate_projects_the_context_once_with_the_same_images(monkeypatch: pytest.MonkeyPatch) -> None:
    class Prompts(nn.Module):
        def forward(self, prompts: list[str]) -> dict[str, Tensor]:
            ctx = [torch.randn(5, 24, generator=torch.Generator().manual_seed(len(p))) for p in prompts]
            return {"context": torch.stack(ctx)}

        def null_inputs(self, n: int) -> list[str]:
            return [""] * n

    net = unet()
    denoiser = Denoiser(net, DiscreteSchedule(beta_schedule="linear")).eval()
    calls = count_kv_projections(net)
    layers = sum(isinstance(m, Attention) and m.is_cross for m in net.modules())

    def run() -> Tensor:
        return generate(
            denoiser,
            Prompts(),
            lambda z: z[:, :3],
            ["red apple", "blue heart"],
            sampler=SAMPLERS["ddim"].fn,
            sigmas=sampling_sigmas(denoiser.schedule, 6),
            latent_shape=(4, 8, 8),
            seeds=[1, 2],
            cfg_scale=3.0,
        )

    cached = run()
    assert calls[0] == layers
    with torch.inference_mode():  # inference tensors have no version counter
        assert torch.equal(run(), cached)
    with cross_attention_cache(net):  # a block inside another: the outer cache stays on
        run()
        assert all(m.kv_cache == {} for m in net.modules() if isinstance(m, Attention) and m.is_cross)
    assert calls[0] == 3 * layers
    monkeypatch.setattr(ldm.generate, "cross_attention_cache", lambda _: contextlib.nullcontext())
    calls[0] = 0
    plain = run()
    assert calls[0] == 6 * layers
    assert torch.equal(cached, plain)


def plain_geglu(ff: GEGLUFeedForward, x: Tensor) -> Tensor:
    value, gate = ff.proj_in(x).chunk(2, dim=-1)
    return ff.proj_out(value * F.gelu(gate))


@pytest.mark.parametrize("autocast", [False, True])
def test_fused_geglu_matches_the_three_ops_with_gradients(autocast: bool) -> None:
    torch.manual_seed(0)
    ff = GEGLUFeedForward(24, dropout=0.0).train()
    x = torch.randn(3, 10, 24, requires_grad=True)
    results = []
    for fn in (ff, lambda t: plain_geglu(ff, t)):
        ff.zero_grad(set_to_none=True)
        x.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = fn(x)
        (out.float() * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        results.append([out, x.grad] + [p.grad for p in ff.parameters()])
    fused, plain = results
    tol = dict(rtol=2e-2, atol=2e-2) if autocast else dict(rtol=1e-6, atol=1e-6)
    assert fused[0].dtype == plain[0].dtype == (torch.bfloat16 if autocast else torch.float32)
    for a, b in zip(fused, plain, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(a, b, **tol)


def test_fused_geglu_saves_fewer_activations_and_steps_like_the_plain_path() -> None:
    """Autograd keeps exactly one (tokens, 4C) float32 tensor less per feed-forward (the product
    value * gelu(gate)); after 3 AdamW steps the weights equal those of the same net trained through the
    plain three-op feed-forward."""

    def saved_bytes(net: UNet) -> int:
        seen: dict[int, int] = {}
        weights = {p.untyped_storage().data_ptr() for p in net.parameters()}

        def pack(t: Tensor) -> Tensor:
            if t.untyped_storage().data_ptr() not in weights:  # activations only (weight.t() is a view)
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        x, t, ctx, mask = inputs()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            net(x, t, context=ctx, context_mask=mask)
        return sum(seen.values())

    fused, plain = unet().train(), unet().train()
    products: list[int] = []
    for m in plain.modules():
        if isinstance(m, GEGLUFeedForward):
            m.forward = functools.partial(plain_geglu, m)
            m.register_forward_pre_hook(
                lambda m, a: products.append(a[0].shape[:-1].numel() * 4 * 4 * m.proj_out.out_features)
            )
    assert saved_bytes(plain) - saved_bytes(fused) == sum(products) > 0
    x, t, ctx, mask = inputs()
    for net in (fused, plain):
        opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
        for _ in range(3):
            opt.zero_grad()
            net(x, t, context=ctx, context_mask=mask).square().mean().backward()
            opt.step()
    for (name, a), b in zip(fused.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_a_compiled_net_is_traced_once_whatever_context_tensors_come() -> None:
    """Identity checks of the cache must stay out of compiled graphs: an ``id(context)`` in the trace
    becomes a guard, and every training step (a new context tensor) would recompile. The cache runs
    eagerly (a graph break per cross-attention layer while sampling), so after the first training step
    and the first cached sampling run, new contexts, masks and cache blocks add no graph."""
    from torch._dynamo.utils import counters

    torch.compiler.reset()
    counters.clear()
    torch.manual_seed(0)
    small = UNet(
        model_channels=16, channel_mult=(1,), attention_resolutions=(1,), num_heads=2, context_dim=24
    )
    net = compile_backbone(small.train(), "full", backend="aot_eager")  # 2 cross-attention layers
    x, t, ctx, mask = inputs()
    graphs = []
    for step in range(3):
        net(x, t, context=ctx + step, context_mask=mask.clone()).square().mean().backward()
        graphs.append(counters["stats"]["unique_graphs"])
    for run in range(3):
        context = ctx + run
        with torch.no_grad(), cross_attention_cache(net):
            cached = [net(x, t * 0.5**step, context=context, context_mask=mask.clone()) for step in range(2)]
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[0] > 0 and graphs[1:3] == graphs[:1] * 2, graphs  # training: traced once
    assert graphs[3] > graphs[2] and graphs[4:] == [graphs[3]] * 2, graphs  # sampling: traced once
    with torch.no_grad():
        torch.testing.assert_close(cached[1], net(x, t * 0.5, context=context, context_mask=mask))
    torch.compiler.reset()
