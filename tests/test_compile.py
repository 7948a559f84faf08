"""``model.compile``: the backbone compiled in place (whole or per block) computes what eager does, keeps its
state_dict keys (no ``_orig_mod.``), and works with the EMA swap and checkpoint round trips."""

from __future__ import annotations

import copy

import pytest
import torch
from hydra.utils import instantiate

from ldm.config_utils import compose_config
from ldm.lit.ema import EMA
from ldm.nets.compile import compile_backbone, compile_mode, is_compiled
from ldm.nets.unet import UNet


def tiny_unet() -> UNet:
    torch.manual_seed(0)
    net = UNet(
        model_channels=16,
        channel_mult=(1, 2),
        attention_resolutions=(2,),
        num_heads=2,
        context_dim=24,
        norm_groups=8,
    )
    with torch.no_grad():  # non-zero output conv, so that the parity check sees every layer
        net.out[-1].weight.normal_(std=0.05)
    return net


def inputs(batch: int = 2) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1)
    return (
        torch.randn(batch, 4, 8, 8, generator=g),
        torch.rand(batch, generator=g) * 999,
        torch.randn(batch, 5, 24, generator=g),
    )


def fwd_bwd(net: torch.nn.Module) -> tuple[torch.Tensor, list[torch.Tensor]]:
    net.zero_grad(set_to_none=True)
    out = net(*inputs())
    out.square().mean().backward()
    return out.detach(), [p.grad.clone() for p in net.parameters()]


def test_compile_mode_names() -> None:
    assert [compile_mode(v) for v in (True, False, None, "regional")] == ["full", "none", "none", "regional"]
    with pytest.raises(
        ValueError, match="model.compile='fast': choose true, false or one of none, regional, full"
    ):
        compile_mode("fast")


@pytest.mark.parametrize("mode", ["full", pytest.param("regional", marks=pytest.mark.slow)])
def test_traced_backbone_equals_eager_and_keeps_its_keys(mode: str) -> None:
    """aot_eager: Dynamo + AOTAutograd tracing as with inductor, without code generation (fast on CPU)."""
    eager = tiny_unet()
    net = compile_backbone(copy.deepcopy(eager), mode, backend="aot_eager")
    assert is_compiled(net) and not is_compiled(eager)
    assert list(net.state_dict()) == list(eager.state_dict())
    out, grads = fwd_bwd(net)
    ref_out, ref_grads = fwd_bwd(eager)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)

    # the EMA swap and a checkpoint round trip see the plain keys, into an eager net and back
    holder = torch.nn.Module()
    holder.net = net
    ema = EMA(decay=0.5)
    ema.shadow = {k: v.detach().clone() + 1 for k, v in net.state_dict().items()}
    with ema.swapped_in(holder):
        swapped = net(*inputs())
    fresh = tiny_unet()
    fresh.load_state_dict({k: v + 1 for k, v in eager.state_dict().items()})
    torch.testing.assert_close(swapped, fresh(*inputs()), rtol=1e-5, atol=1e-5)
    fresh.load_state_dict(net.state_dict())
    torch.testing.assert_close(fresh(*inputs()), net(*inputs()), rtol=1e-5, atol=1e-6)


def test_model_compile_from_the_config_keeps_checkpoint_keys() -> None:
    cfg = compose_config("train", ["net=unet_tiny", "model.compile=regional"])
    module = instantiate(cfg.model)
    assert is_compiled(module.net)
    keys = list(module.state_dict())
    assert keys and not any("_orig_mod" in k for k in keys)
    with pytest.raises(ValueError, match="model.compile=regional: Linear has no ResBlock"):
        compile_backbone(torch.nn.Linear(2, 2), "regional")


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["full", "regional"])
def test_inductor_backbone_matches_eager(mode: str) -> None:
    """The real thing (C++ code generation on CPU): minutes on a loaded 2-core machine, hence slow."""
    eager = tiny_unet()
    net = compile_backbone(copy.deepcopy(eager), mode)
    out, grads = fwd_bwd(net)
    ref_out, ref_grads = fwd_bwd(eager)
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-5)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-3, atol=1e-5)
