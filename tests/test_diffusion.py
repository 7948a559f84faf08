"""Maths tests for ldm.diffusion: schedule parity with diffusers, denoiser round trips, the training loss."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler
from torch import Tensor, nn

from ldm.diffusion import Denoiser, DiffusionLoss, DiscreteSchedule

CONFIGS = [("linear", 0.0001, 0.02), ("scaled_linear", 0.00085, 0.012)]


def _reference(
    beta_schedule: str, beta_start: float, beta_end: float, prediction: str = "eps"
) -> DDPMScheduler:
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule=beta_schedule,
        beta_start=beta_start,
        beta_end=beta_end,
        prediction_type="epsilon" if prediction == "eps" else "v_prediction",
    )


@pytest.mark.parametrize(("beta_schedule", "beta_start", "beta_end"), CONFIGS)
def test_schedule_matches_diffusers(beta_schedule: str, beta_start: float, beta_end: float) -> None:
    ours = DiscreteSchedule(1000, beta_schedule, beta_start, beta_end)
    ref = _reference(beta_schedule, beta_start, beta_end)
    assert ours.betas.dtype == torch.float64 and ours.betas.shape == (1000,)
    torch.testing.assert_close(ours.betas, ref.betas.double(), rtol=1e-6, atol=0)
    torch.testing.assert_close(ours.alphas_cumprod, ref.alphas_cumprod.double(), rtol=2e-5, atol=0)
    expected_sigmas = ((1 - ours.alphas_cumprod) / ours.alphas_cumprod).sqrt()
    torch.testing.assert_close(ours.sigmas, expected_sigmas, rtol=1e-12, atol=0)
    assert ours.sigma_min == pytest.approx(float(ours.sigmas[0]))
    assert ours.sigma_max == pytest.approx(float(ours.sigmas[-1]))
    assert bool((ours.sigmas[1:] > ours.sigmas[:-1]).all())


def test_sigma_to_t_is_exact_on_the_grid() -> None:
    sched = DiscreteSchedule()
    grid = torch.arange(1000, dtype=torch.float64)
    assert torch.equal(sched.sigma_to_t(sched.sigmas), grid)
    t32 = sched.sigma_to_t(sched.sigmas.float())
    assert t32.dtype == torch.float32 and torch.equal(t32, grid.float())
    assert torch.equal(sched.t_to_sigma(grid), sched.sigmas)
    assert sched.sigma_to_t(torch.tensor(sched.sigma_max, dtype=torch.float64)).ndim == 0


def test_sigma_t_round_trip_and_interpolation() -> None:
    sched = DiscreteSchedule(1000, "linear", 0.0001, 0.02)
    t = torch.rand(257, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 999
    torch.testing.assert_close(sched.sigma_to_t(sched.t_to_sigma(t)), t, rtol=0, atol=1e-9)
    sigma = torch.exp(torch.linspace(sched.log_sigmas[0], sched.log_sigmas[-1], 101, dtype=torch.float64))
    torch.testing.assert_close(sched.t_to_sigma(sched.sigma_to_t(sigma)), sigma, rtol=1e-10, atol=0)
    # halfway in log-sigma between two grid points is halfway in t
    mid = ((sched.log_sigmas[10] + sched.log_sigmas[11]) / 2).exp()
    assert float(sched.sigma_to_t(mid)) == pytest.approx(10.5, abs=1e-9)
    # out-of-range sigmas clamp to the ends of the grid
    assert sched.sigma_to_t(torch.tensor([1e-6, 1e6])).tolist() == [0.0, 999.0]


class _OracleNet(nn.Module):
    """Returns the true eps or v for a known (x0, eps); records what the denoiser feeds it."""

    def __init__(self, x0: Tensor, eps: Tensor, sigma: Tensor, prediction: str) -> None:
        super().__init__()
        abar = 1.0 / (1.0 + sigma**2)  # (B,)
        a, b = abar.sqrt().view(-1, 1, 1, 1), (1 - abar).sqrt().view(-1, 1, 1, 1)
        self.out = eps if prediction == "eps" else a * eps - b * x0
        self.x_t = a * x0 + b * eps  # (B, C, H, W) the VP input the net was trained on
        self.seen: dict[str, object] = {}

    def forward(self, x: Tensor, c_noise: Tensor, context=None, context_mask=None) -> Tensor:
        self.seen.update(x=x, c_noise=c_noise, context=context, context_mask=context_mask)
        return self.out


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_denoiser_recovers_x0_with_oracle_net(prediction: str) -> None:
    sched = DiscreteSchedule()
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64)
    eps = torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64)
    sigma = sched.sigmas[torch.tensor([0, 10, 500, 999])]  # (4,)
    net = _OracleNet(x0, eps, sigma, prediction)
    den = Denoiser(net, sched, prediction)
    context, mask = torch.randn(4, 7, 16), torch.ones(4, 7, dtype=torch.bool)
    out = den(x0 + sigma.view(-1, 1, 1, 1) * eps, sigma, context=context, context_mask=mask)
    torch.testing.assert_close(out, x0, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(net.seen["x"], net.x_t, rtol=1e-12, atol=1e-12)
    assert net.seen["c_noise"].tolist() == [0.0, 10.0, 500.0, 999.0]
    assert net.seen["context"] is context and net.seen["context_mask"] is mask


def test_denoiser_scalar_sigma_and_bad_shapes() -> None:
    sched = DiscreteSchedule()
    x0, eps = torch.randn(3, 2, 4, 4, dtype=torch.float64), torch.randn(3, 2, 4, 4, dtype=torch.float64)
    sigma = sched.sigmas[300]
    net = _OracleNet(x0, eps, sigma.expand(3), "eps")
    out = Denoiser(net, sched, "eps")(x0 + sigma * eps, sigma)
    torch.testing.assert_close(out, x0)
    assert net.seen["c_noise"].shape == (3,)
    with pytest.raises(ValueError, match="one sigma per sample"):
        Denoiser(net, sched)(x0, torch.ones(2))
    with pytest.raises(ValueError, match="prediction must be one of"):
        Denoiser(net, sched, "score")


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_loss_noising_and_targets_match_diffusers(prediction: str) -> None:
    loss = DiffusionLoss(DiscreteSchedule(), prediction)
    ref = _reference("scaled_linear", 0.00085, 0.012, prediction)
    x0 = torch.randn(6, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([0, 1, 250, 500, 998, 999])
    eps = loss.draw(x0, torch.Generator().manual_seed(3))["eps"]  # the noise the loss call below draws
    expected = eps if prediction == "eps" else ref.get_velocity(x0, eps, t)
    net = _OracleNet(x0, eps, loss.schedule.sigmas[t], prediction)
    net.out = expected  # diffusers' target: a net predicting it exactly has zero loss
    per_sample = loss(
        net, x0, generator=torch.Generator().manual_seed(3), sigma=loss.schedule.sigmas[t], reduce=False
    )
    torch.testing.assert_close(net.seen["x"], ref.add_noise(x0, eps, t), rtol=1e-5, atol=1e-5)
    assert float(per_sample.max()) < 1e-9


class _LossOracle(nn.Module):
    """Knows x0, so it can invert x_t -> eps (or v) exactly; ``scale`` != 1 makes it wrong."""

    def __init__(self, x0: Tensor, sched: DiscreteSchedule, prediction: str, scale: float = 1.0) -> None:
        super().__init__()
        self.x0, self.abar, self.prediction, self.scale = x0, sched.alphas_cumprod, prediction, scale
        self.weight = nn.Parameter(torch.ones((), dtype=x0.dtype))

    def forward(self, x_t: Tensor, t: Tensor, context=None, context_mask=None) -> Tensor:
        assert t.dtype == torch.float32 and torch.equal(t, t.round())
        abar = self.abar[t.long()].view(-1, 1, 1, 1)  # (B, 1, 1, 1)
        eps = (x_t - abar.sqrt() * self.x0) / (1 - abar).sqrt()
        out = eps if self.prediction == "eps" else abar.sqrt() * eps - (1 - abar).sqrt() * self.x0
        return self.weight * self.scale * out


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_loss_is_zero_for_oracle_and_positive_otherwise(prediction: str) -> None:
    sched = DiscreteSchedule()
    loss = DiffusionLoss(sched, prediction)
    x0 = torch.randn(8, 4, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    value = loss(_LossOracle(x0, sched, prediction), x0, generator=torch.Generator().manual_seed(0))
    assert value.ndim == 0 and float(value.detach()) < 1e-20
    wrong = _LossOracle(x0, sched, prediction, scale=0.5)
    value = loss(wrong, x0, generator=torch.Generator().manual_seed(0))
    assert float(value.detach()) > 1e-2
    value.backward()
    assert wrong.weight.grad is not None and float(wrong.weight.grad.abs()) > 0


def test_loss_is_reproducible_with_a_generator_and_passes_context() -> None:
    loss = DiffusionLoss(DiscreteSchedule(), "eps")
    seen: list[tuple] = []

    class Net(nn.Module):
        def forward(self, x: Tensor, t: Tensor, context=None, context_mask=None) -> Tensor:
            seen.append((t.clone(), context, context_mask))
            return torch.tanh(x) * torch.cos(t / 300).view(-1, 1, 1, 1)

    x0, ctx, mask = torch.randn(5, 4, 4, 4), torch.randn(5, 3, 8), torch.ones(5, 3, dtype=torch.bool)
    a = loss(Net(), x0, ctx, mask, generator=torch.Generator().manual_seed(9))
    b = loss(Net(), x0, ctx, mask, generator=torch.Generator().manual_seed(9))
    c = loss(Net(), x0, ctx, mask, generator=torch.Generator().manual_seed(10))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(seen[0][0], seen[1][0]) and seen[0][1] is ctx and seen[0][2] is mask
    assert float(seen[0][0].min()) >= 0 and float(seen[0][0].max()) <= 999
    with pytest.raises(ValueError, match="out_channels"):
        loss(lambda x, t, **kw: x[:, :2], x0)
