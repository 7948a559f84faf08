"""Maths tests for the objectives: schedules (cosine, zero-terminal SNR, EDM, flow), parameterisations,
noise-level samplers, loss weightings, offset noise and input perturbation. Each checks a formula, not just
that it runs."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_snr
from torch import Tensor, nn

from ldm.diffusion import (
    Denoiser,
    DiffusionLoss,
    DiscreteSchedule,
    EDMSchedule,
    EDMWeighting,
    FlowSchedule,
    LogitNormalTimesteps,
    LogNormalSigmas,
    MinSNRWeighting,
    UniformTimesteps,
)
from ldm.diffusion import parameterization as param

SCHEDULES = {
    "vp": lambda: DiscreteSchedule(),
    "edm": lambda: EDMSchedule(sigma_data=0.5),
    "flow": lambda: FlowSchedule(shift=3.0),
}
TRAIN_LEVELS = {  # a few noise levels inside each schedule's range (t for flow)
    "vp": lambda s: s.sigmas[torch.tensor([0, 3, 200, 600, 999])],
    "edm": lambda s: torch.tensor([0.002, 0.1, 0.5, 3.0, 80.0], dtype=torch.float64),
    "flow": lambda s: torch.tensor([1e-3, 0.1, 0.5, 0.9, 0.999], dtype=torch.float64),
}


def _data(seed: int = 0, shape=(5, 3, 4, 4)) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64), torch.randn(
        shape, generator=g, dtype=torch.float64
    )


def _view(v: Tensor) -> Tensor:
    return v.reshape(-1, 1, 1, 1)


# ---------------------------------------------------------------- schedules
def test_cosine_schedule_matches_diffusers_and_the_formula() -> None:
    ours = DiscreteSchedule(1000, "cosine")
    ref = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    torch.testing.assert_close(ours.betas, ref.betas.double(), rtol=1e-6, atol=1e-9)
    # abar_t = f(t+1)/f(0) with f(t) = cos^2((t/T + s)/(1 + s) pi/2), as long as no beta hit the 0.999 cap
    f = lambda t: math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    for t in [0, 10, 500, 900]:
        assert float(ours.alphas_cumprod[t]) == pytest.approx(f(t + 1) / f(0), rel=1e-9)
    assert float(ours.betas.max()) == pytest.approx(0.999)


@pytest.mark.parametrize("beta_schedule", ["scaled_linear", "linear", "cosine"])
def test_zero_terminal_snr_rescale(beta_schedule: str) -> None:
    plain = DiscreteSchedule(1000, beta_schedule, 0.00085, 0.012)
    ours = DiscreteSchedule(1000, beta_schedule, 0.00085, 0.012, zero_terminal_snr=True)
    ref = DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule={"cosine": "squaredcos_cap_v2"}.get(beta_schedule, beta_schedule),
        beta_start=0.00085,
        beta_end=0.012,
        rescale_betas_zero_snr=True,
    )
    torch.testing.assert_close(ours.alphas_cumprod, ref.alphas_cumprod.double(), rtol=1e-5, atol=1e-7)
    assert float(ours.alphas_cumprod[-1]) == 0.0  # SNR(T) = 0 exactly
    assert float(ours.alphas_cumprod[0]) == pytest.approx(float(plain.alphas_cumprod[0]), rel=1e-12)
    # Lin et al. Alg. 1 is affine in sqrt(abar): (sqrt(abar) - last) / (first - last) is preserved
    a, b = plain.alphas_cumprod.sqrt(), ours.alphas_cumprod.sqrt()
    torch.testing.assert_close((a - a[-1]) / (a[0] - a[-1]), b / b[0], rtol=1e-9, atol=1e-12)
    # the sigma view clamps abar_T to 2^-24 like diffusers' sigma-space schedulers: sigma_max = sqrt(2^24 - 1)
    assert ours.sigma_max == pytest.approx(math.sqrt(2**24 - 1), rel=1e-9)
    assert torch.isfinite(ours.sigmas).all()


def test_flow_shift_matches_sd3_formula_and_diffusers() -> None:
    sched = FlowSchedule(shift=3.0)
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    torch.testing.assert_close(sched.shift_t(t), 3 * t / (1 + 2 * t))
    ref = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    unshifted = torch.linspace(1, 1000, 1000, dtype=torch.float64).flip(0) / 1000
    torch.testing.assert_close(sched.shift_t(unshifted), ref.sigmas.double(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ["vp", "edm", "flow"])
def test_schedule_coefficients(name: str) -> None:
    sched = SCHEDULES[name]()
    level = TRAIN_LEVELS[name](sched)
    a, alpha, s = sched.coefficients(level)
    if name == "vp":  # alpha = sqrt(abar), s = sqrt(1 - abar): the DDPM forward process
        abar = sched.alphas_cumprod[torch.tensor([0, 3, 200, 600, 999])]
        torch.testing.assert_close(alpha, abar.sqrt(), rtol=1e-12, atol=0)
        torch.testing.assert_close(s, (1 - abar).sqrt(), rtol=1e-10, atol=0)
        torch.testing.assert_close(
            sched.c_noise(level), torch.tensor([0, 3, 200, 600, 999.0], dtype=torch.float64)
        )
    elif name == "edm":  # c_in = 1/sqrt(sigma^2 + sd^2), c_noise = ln(sigma)/4 (x1000 for our UNet)
        torch.testing.assert_close(a, 1 / (level**2 + 0.25).sqrt())
        torch.testing.assert_close(s, level * a)
        torch.testing.assert_close(sched.c_noise(level), 250 * level.log())
    else:  # x_t = (1 - t) x0 + t eps
        torch.testing.assert_close(alpha, 1 - level)
        torch.testing.assert_close(s, level)
        assert torch.equal(a, torch.ones_like(level))
        torch.testing.assert_close(sched.c_noise(level), 1000 * level)


# ---------------------------------------------------------------- parameterisations
PAIRS = [(n, p) for n in ("vp", "edm", "flow") for p in param.PREDICTIONS]


@pytest.mark.parametrize(("name", "prediction"), PAIRS)
def test_parameterisation_round_trips_and_error_scale(name: str, prediction: str) -> None:
    sched = SCHEDULES[name]()
    level = TRAIN_LEVELS[name](sched)
    _, alpha, s = (_view(c) for c in sched.coefficients(level))
    x0, eps = _data()
    x_in = alpha * x0 + s * eps
    sd = sched.sigma_data
    p = param.parameterization(prediction)
    f = p.target(x0, eps, alpha, s, sd)
    torch.testing.assert_close(p.to_x0(f, x_in, alpha, s, sd), x0, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(p.from_x0(x0, x_in, alpha, s, sd), f, rtol=1e-7, atol=1e-7)
    # k = (dF/dx0)^2 at fixed x_in: perturb x0 by d, F moves by sqrt(k) d
    d = 1e-3 * torch.randn_like(x0)
    df = p.from_x0(x0 + d, x_in, alpha, s, sd) - f
    k = _view(p.error_scale(alpha.flatten(), s.flatten(), sd))
    torch.testing.assert_close(df.pow(2), k * d.pow(2), rtol=1e-6, atol=1e-12)


def test_named_parameterisations_are_the_textbook_ones() -> None:
    sched = DiscreteSchedule()
    t = torch.tensor([5, 300, 900])
    ref = DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012
    )
    _, alpha, s = (_view(c) for c in sched.coefficients(sched.sigmas[t]))
    x0, eps = _data(1, (3, 2, 4, 4))
    torch.testing.assert_close(
        param.parameterization("v").target(x0, eps, alpha, s, 1.0),
        ref.get_velocity(x0, eps, t).double(),
        rtol=1e-5,
        atol=1e-6,
    )
    # EDM: D = c_skip x + c_out F with c_skip = sd^2/(sigma^2+sd^2), c_out = sigma sd / sqrt(sigma^2+sd^2)
    edm = EDMSchedule(sigma_data=0.5)
    sigma = torch.tensor([0.01, 1.0, 50.0], dtype=torch.float64)
    _, alpha, s = (_view(c) for c in edm.coefficients(sigma))
    x = x0 + _view(sigma) * eps
    out = torch.randn_like(x0)
    c_skip = 0.25 / (_view(sigma) ** 2 + 0.25)
    c_out = _view(sigma) * 0.5 / (_view(sigma) ** 2 + 0.25).sqrt()
    edm_x0 = param.parameterization("edm").to_x0(out, alpha * x, alpha, s, 0.5)
    torch.testing.assert_close(edm_x0, c_skip * x + c_out * out)


class _Recorder(nn.Module):
    def __init__(self, out: Tensor) -> None:
        super().__init__()
        self.out, self.seen = out, {}

    def forward(self, x: Tensor, c_noise: Tensor, context=None, context_mask=None) -> Tensor:
        self.seen.update(x=x, c_noise=c_noise)
        return self.out


@pytest.mark.parametrize(
    ("name", "prediction"), [("edm", "edm"), ("flow", "flow"), ("vp", "x0"), ("vp", "v")]
)
def test_denoiser_preconditions_and_recovers_x0(name: str, prediction: str) -> None:
    sched = SCHEDULES[name]()
    level = TRAIN_LEVELS[name](sched)
    _, alpha, s = (_view(c) for c in sched.coefficients(level))
    x0, eps = _data(2)
    x = x0 + _view(level) * eps if sched.space == "ve" else alpha * x0 + s * eps
    net = _Recorder(param.parameterization(prediction).target(x0, eps, alpha, s, sched.sigma_data))
    den = Denoiser(net, sched, prediction)
    torch.testing.assert_close(den(x, level), x0, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(net.seen["x"], alpha * x0 + s * eps)  # the net sees its training input
    torch.testing.assert_close(net.seen["c_noise"], sched.c_noise(level))
    f = den.prediction_from_x0(x, level, x0)
    torch.testing.assert_close(f, net.out, rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(den.x0_from_prediction(x, level, f), x0, rtol=1e-8, atol=1e-8)


# ---------------------------------------------------------------- noise-level samplers
def test_uniform_timesteps_are_uniform_integers_on_a_discrete_schedule() -> None:
    sched = DiscreteSchedule()
    sigma = UniformTimesteps()(sched, 200_000, torch.Generator().manual_seed(0), torch.device("cpu"))
    t = sched.sigma_to_t(sigma)
    assert torch.equal(t, t.round()) and float(t.min()) == 0 and float(t.max()) == 999
    counts = torch.bincount(t.long(), minlength=1000).double()  # expected 200 per timestep
    chi2 = float(((counts - 200) ** 2 / 200).sum())
    assert chi2 < 1000 + 5 * math.sqrt(2 * 999)  # chi-square with 999 dof, 5 standard deviations


def test_logit_normal_and_log_normal_moments() -> None:
    g, cpu = torch.Generator().manual_seed(1), torch.device("cpu")
    t = LogitNormalTimesteps(mean=0.5, std=0.8)(FlowSchedule(shift=1.0), 100_000, g, cpu)
    logit = torch.log(t / (1 - t))
    assert float(logit.mean()) == pytest.approx(0.5, abs=0.01) and float(logit.std()) == pytest.approx(
        0.8, abs=0.01
    )
    shifted = LogitNormalTimesteps()(FlowSchedule(shift=3.0), 100_000, torch.Generator().manual_seed(1), cpu)
    base = LogitNormalTimesteps()(FlowSchedule(shift=1.0), 100_000, torch.Generator().manual_seed(1), cpu)
    torch.testing.assert_close(shifted, 3 * base / (1 + 2 * base))  # the shift is applied to the drawn t
    sigma = LogNormalSigmas(-1.2, 1.2)(EDMSchedule(), 100_000, torch.Generator().manual_seed(2), cpu)
    assert float(sigma.log().mean()) == pytest.approx(-1.2, abs=0.02)
    assert float(sigma.log().std()) == pytest.approx(1.2, abs=0.02)
    assert float(sigma.min()) >= 0.002 and float(sigma.max()) <= 80.0
    with pytest.raises(ValueError, match="LogitNormalTimesteps"):
        LogNormalSigmas()(FlowSchedule(), 4, None, cpu)


# ---------------------------------------------------------------- weightings and the loss value
@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_min_snr_weights_match_the_diffusers_training_script(prediction: str) -> None:
    sched = DiscreteSchedule()
    ref = DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012
    )
    t = torch.tensor([0, 10, 100, 400, 700, 999])
    snr = compute_snr(ref, t).double()
    expected = snr.clamp(max=5.0) / (snr if prediction == "eps" else snr + 1)  # train_text_to_image.py
    _, alpha, s = sched.coefficients(sched.sigmas[t])
    k = param.parameterization(prediction).error_scale(alpha, s, 1.0)
    torch.testing.assert_close(MinSNRWeighting(5.0)(alpha, s, k, 1.0), expected, rtol=1e-4, atol=0)


def test_edm_weighting_is_one_for_edm_preconditioning() -> None:
    sched = EDMSchedule(sigma_data=0.5)
    sigma = torch.tensor([0.002, 0.3, 5.0, 80.0], dtype=torch.float64)
    _, alpha, s = sched.coefficients(sigma)
    k = param.parameterization("edm").error_scale(alpha, s, 0.5)
    torch.testing.assert_close(EDMWeighting()(alpha, s, k, 0.5), torch.ones(4, dtype=torch.float64))
    lam = (sigma**2 + 0.25) / (0.5 * sigma) ** 2  # EDM Table 1, lambda(sigma) on the x0 error
    k_eps = param.parameterization("eps").error_scale(alpha, s, 0.5)
    torch.testing.assert_close(EDMWeighting()(alpha, s, k_eps, 0.5) * k_eps, lam)


class _OffsetOracle(nn.Module):
    """Returns target + delta for known (x0, eps); records the input it was given."""

    def __init__(self, loss: DiffusionLoss, x0: Tensor, draw: dict, delta: float) -> None:
        super().__init__()
        self.loss, self.x0, self.draw, self.delta = loss, x0, draw, delta
        self.inputs: list[Tensor] = []

    def forward(self, x: Tensor, c_noise: Tensor, context=None, context_mask=None) -> Tensor:
        self.inputs.append(x)
        return _target(self.loss, self.x0, self.draw["sigma"], self.draw["eps"]) + self.delta


def _coefficients(loss: DiffusionLoss, x0: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
    _, alpha, s = loss.schedule.coefficients(sigma)
    return _view(alpha).to(x0.dtype), _view(s).to(x0.dtype)  # (B, 1, 1, 1) as the loss uses them


def _target(loss: DiffusionLoss, x0: Tensor, sigma: Tensor, eps: Tensor) -> Tensor:
    alpha, s = _coefficients(loss, x0, sigma)
    return loss.parameterization.target(x0, eps, alpha, s, loss.schedule.sigma_data)


@pytest.mark.parametrize(
    ("name", "prediction", "weighting"),
    [
        ("vp", "eps", MinSNRWeighting(5.0)),
        ("vp", "v", MinSNRWeighting(1.0)),
        ("edm", "edm", EDMWeighting()),
        ("flow", "flow", None),
        ("vp", "x0", None),
        ("edm", "eps", EDMWeighting()),
    ],
)
def test_loss_value_is_the_weighted_mse(name: str, prediction: str, weighting) -> None:
    sched = SCHEDULES[name]()
    timesteps = LogNormalSigmas() if name == "edm" else (LogitNormalTimesteps() if name == "flow" else None)
    loss = DiffusionLoss(sched, prediction, timesteps=timesteps, weighting=weighting)
    x0 = _data(3, (6, 2, 4, 4))[0]
    draw = loss.draw(x0, torch.Generator().manual_seed(5))
    net = _OffsetOracle(loss, x0, draw, delta=0.1)
    value = loss(net, x0, generator=torch.Generator().manual_seed(5))
    _, alpha, s = sched.coefficients(draw["sigma"])
    k = param.parameterization(prediction).error_scale(alpha, s, sched.sigma_data)
    w = torch.ones(6, dtype=torch.float64) if weighting is None else weighting(alpha, s, k, sched.sigma_data)
    assert float(value) == pytest.approx(float((w * 0.01).mean()), rel=1e-9)
    alpha, s = _coefficients(loss, x0, draw["sigma"])
    torch.testing.assert_close(net.inputs[0], alpha * x0 + s * draw["eps"])


def test_offset_noise_shifts_channel_means_and_is_the_target() -> None:
    x0 = torch.zeros(4000, 3, 8, 8)
    plain = DiffusionLoss(DiscreteSchedule()).draw(x0, torch.Generator().manual_seed(0))["eps"]
    offset = DiffusionLoss(DiscreteSchedule(), offset_noise=0.1).draw(x0, torch.Generator().manual_seed(0))[
        "eps"
    ]
    # per-(sample, channel) means: variance 1/64 without, 1/64 + 0.1^2 with offset noise
    assert float(plain.mean((2, 3)).var()) == pytest.approx(1 / 64, rel=0.05)
    assert float(offset.mean((2, 3)).var()) == pytest.approx(1 / 64 + 0.01, rel=0.05)
    loss = DiffusionLoss(DiscreteSchedule(), offset_noise=0.1)
    x0 = _data(4, (4, 3, 4, 4))[0].float()
    draw = loss.draw(x0, torch.Generator().manual_seed(1))
    net = _OffsetOracle(loss, x0, draw, delta=0.0)  # predicts the offset noise exactly
    assert float(loss(net, x0, generator=torch.Generator().manual_seed(1))) < 1e-12
    with pytest.raises(ValueError, match="offset_noise and input_perturbation must be >= 0"):
        DiffusionLoss(DiscreteSchedule(), offset_noise=-0.1)


def test_input_perturbation_noises_the_input_but_not_the_target() -> None:
    gamma = 0.1
    loss = DiffusionLoss(DiscreteSchedule(), "eps", input_perturbation=gamma)
    x0 = _data(5, (64, 4, 8, 8))[0].float()
    draw = loss.draw(x0, torch.Generator().manual_seed(2))
    assert not torch.equal(draw["noise_in"], draw["eps"])
    xi = (draw["noise_in"] - draw["eps"]) / gamma  # the extra noise is N(0, 1)
    assert float(xi.std()) == pytest.approx(1.0, abs=0.02) and float(xi.mean()) == pytest.approx(
        0.0, abs=0.02
    )

    class InputNoiseOracle(nn.Module):  # recovers the noise in its input exactly: eps + gamma xi
        def forward(self, x: Tensor, c_noise: Tensor, context=None, context_mask=None) -> Tensor:
            _, alpha, s = (_view(c).float() for c in loss.schedule.coefficients(draw["sigma"]))
            return (x - alpha * x0) / s

    # the target is eps, so predicting the input's noise costs exactly gamma^2 E[xi^2]
    value = loss(InputNoiseOracle(), x0, generator=torch.Generator().manual_seed(2))
    assert float(value) == pytest.approx(gamma**2 * float(xi.pow(2).mean()), rel=1e-3)


def test_eps_prediction_is_refused_where_alpha_reaches_zero() -> None:
    for sched in (FlowSchedule(), DiscreteSchedule(zero_terminal_snr=True)):
        with pytest.raises(ValueError, match="use diffusion.prediction=v"):
            Denoiser(nn.Identity(), sched, "eps")
        with pytest.raises(ValueError, match="use diffusion.prediction=v"):
            DiffusionLoss(sched, "eps")
    Denoiser(nn.Identity(), DiscreteSchedule(1000, "cosine"), "eps")  # tiny but nonzero alpha: allowed
    Denoiser(nn.Identity(), EDMSchedule(), "eps")
