"""Guidance rescale (parity with diffusers' rescale_noise_cfg) and the guidance interval."""

from __future__ import annotations

import pytest
import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg
from torch import Tensor, nn

from ldm.diffusion import Denoiser, DiscreteSchedule
from ldm.sampling import CFGDenoiser


class ContextNet(nn.Module):
    """A deterministic stand-in for a conditional net: output depends on x, t and the pooled context."""

    def forward(self, x: Tensor, c_noise: Tensor, context: Tensor, context_mask: Tensor) -> Tensor:
        pooled = (context * context_mask[..., None]).sum(1).mean(-1)  # (B,)
        return torch.tanh(0.5 * x) * torch.cos(c_noise / 300).view(-1, 1, 1, 1) + pooled.view(-1, 1, 1, 1) * x


class Counting(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.batches = inner, []

    def forward(self, x, c_noise, context, context_mask):
        self.batches.append(x.shape[0])
        return self.inner(x, c_noise, context, context_mask)


def _conds() -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(3)
    ones = torch.ones(2, 4, dtype=torch.bool)
    return (
        {"context": torch.randn(2, 4, 8, generator=g), "context_mask": ones},
        {"context": torch.randn(1, 4, 8, generator=g), "context_mask": ones[:1]},
    )


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("phi", [0.0, 0.7, 1.0])
def test_guidance_rescale_matches_diffusers_in_the_models_prediction_space(
    prediction: str, phi: float
) -> None:
    sched, net = DiscreteSchedule(), ContextNet()
    den = Denoiser(net, sched, prediction)
    cond, uncond = _conds()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 5
    sigma = sched.sigmas[torch.tensor([600, 600])].float()
    conv = {"to_prediction": den.prediction_from_x0, "from_prediction": den.x0_from_prediction}
    ours = CFGDenoiser(den, cond, uncond, scale=7.5, rescale=phi, **conv)(x, sigma)
    # the diffusers pipeline: guide the raw model output, rescale it, then the scheduler turns it into x0
    x_in, t = x / (1 + sigma.view(-1, 1, 1, 1) ** 2).sqrt(), sched.sigma_to_t(sigma)
    out_c = net(x_in, t, **cond)
    out_u = net(x_in, t, **{k: v.expand(2, *v.shape[1:]) for k, v in uncond.items()})
    guided = rescale_noise_cfg(out_u + 7.5 * (out_c - out_u), out_c, guidance_rescale=phi)
    expected = den.x0_from_prediction(x, sigma, guided)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    if phi > 0:  # rescaled: the guided prediction's std equals the conditional one's (phi = 1)
        plain = CFGDenoiser(den, cond, uncond, scale=7.5)(x, sigma)
        assert not torch.allclose(ours, plain)
    if phi == 1.0:
        pred = den.prediction_from_x0(x, sigma, ours)
        torch.testing.assert_close(pred.std(dim=(1, 2, 3)), out_c.std(dim=(1, 2, 3)), rtol=1e-4, atol=1e-5)


def test_guidance_interval_guides_only_inside_the_sigma_range() -> None:
    sched = DiscreteSchedule()
    inner = Counting(ContextNet())
    den = Denoiser(inner, sched, "eps")
    cond, uncond = _conds()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    guided = CFGDenoiser(den, cond, uncond, scale=5.0, interval=(0.5, 3.0))
    full = CFGDenoiser(den, cond, uncond, scale=5.0)
    inside, below, above = torch.tensor(1.0), torch.tensor(0.1), torch.tensor(10.0)
    inner.batches.clear()
    out_in = guided(x, inside)
    assert inner.batches == [4]  # both branches in one doubled call
    torch.testing.assert_close(out_in, full(x, inside))
    for sigma in (below, above):
        inner.batches.clear()
        out = guided(x, sigma)
        assert inner.batches == [2]  # conditional branch only: half the work
        torch.testing.assert_close(out, den(x, sigma, **cond))
    # a batch straddling the interval: guided rows where inside, conditional rows elsewhere
    mixed = guided(x, torch.tensor([1.0, 10.0]))
    torch.testing.assert_close(mixed[:1], full(x, inside)[:1])
    torch.testing.assert_close(mixed[1:], den(x, above, **cond)[1:])


def test_guidance_options_reject_bad_values() -> None:
    cond, uncond = _conds()
    den = Denoiser(ContextNet(), DiscreteSchedule())
    with pytest.raises(ValueError, match="rescale must be in"):
        CFGDenoiser(den, cond, uncond, 5.0, rescale=1.5, to_prediction=den.prediction_from_x0)
    with pytest.raises(ValueError, match="lo < hi"):
        CFGDenoiser(den, cond, uncond, 5.0, interval=(3.0, 1.0))
    with pytest.raises(TypeError, match="prediction space"):
        CFGDenoiser(lambda x, s, **kw: x, cond, uncond, 5.0, rescale=0.5)
