"""Samplers against exact maths: Gaussian data has a closed-form denoiser and probability-flow ODE solution.

For x0 ~ N(MU, S^2) (per dimension) and x = x0 + sigma * eps (VE), E[x0 | x] = (S^2 x + sigma^2 MU) / (S^2 +
sigma^2) and the probability-flow ODE maps x(sigma_T) to x(sigma) = MU + (x(sigma_T) - MU) * sqrt(S^2 +
sigma^2) / sqrt(S^2 + sigma_T^2) (the marginals are N(MU, S^2 + sigma^2) and the 1-D flow is affine).
Deterministic samplers are run from the same x_T at growing step counts and the global error's log-log slope
gives their order. The VE schedules here end at SIGMA_MIN > 0 (no final 0): the last step to 0 of Heun / DPM++
/ UniPC is first order by design (the x0 estimate) and would add an N-independent error floor that hides the
order.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import Tensor

from ldm.sampling import (
    get_sigmas_flow,
    get_sigmas_karras,
    sample_ddim,
    sample_ddpm,
    sample_dpmpp_2m,
    sample_dpmpp_2m_sde,
    sample_euler,
    sample_euler_ancestral,
    sample_flow_euler,
    sample_heun,
    sample_plms,
    sample_unipc,
)
from ldm.sampling.registry import SAMPLERS, samplers_for

MU, S = 0.5, 0.3
SIGMA_MAX, SIGMA_MIN = 10.0, 0.02
STEPS = [16, 32, 64, 128]


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Elementwise ops on 1e5-sample batches: intra-op threads only contend on a shared two-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def gaussian_denoiser(x: Tensor, sigma: Tensor) -> Tensor:
    """Exact E[x0 | x] for x0 ~ N(MU, S^2), x = x0 + sigma * eps. x (B,), sigma (B,)."""
    return (S**2 * x + sigma**2 * MU) / (S**2 + sigma**2)


def log_uniform_sigmas(steps: int) -> Tensor:
    """(steps + 1,) float64 sigmas uniform in lambda = -log sigma from SIGMA_MAX to SIGMA_MIN."""
    return torch.from_numpy(np.geomspace(SIGMA_MAX, SIGMA_MIN, steps + 1))


def karras_sigmas(steps: int) -> Tensor:
    """(steps + 1,) Karras sigmas from SIGMA_MAX to SIGMA_MIN (get_sigmas_karras without its final 0)."""
    return get_sigmas_karras(steps + 1, SIGMA_MIN, SIGMA_MAX)[:-1].double()


def _x_T(n: int, sigma_T: float, seed: int = 0) -> Tensor:
    z = torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return MU + math.sqrt(S**2 + sigma_T**2) * z  # (n,) exact marginal at sigma_T


def _slope(steps: list[int], errors: list[float]) -> float:
    return float(np.polyfit(np.log(steps), np.log(errors), 1)[0])


def ode_errors(sampler, schedule) -> list[float]:
    """Max abs error against the exact ODE solution for each step count in STEPS."""
    errors = []
    for steps in STEPS:
        sigmas = schedule(steps)
        sigma_T, sigma_end = float(sigmas[0]), float(sigmas[-1])
        x_T = _x_T(2048, sigma_T)
        exact = MU + (x_T - MU) * math.sqrt(S**2 + sigma_end**2) / math.sqrt(S**2 + sigma_T**2)
        errors.append(float((sampler(gaussian_denoiser, x_T, sigmas) - exact).abs().max()))
    return errors


# (name, sampler, expected global order). PLMS: PNDM's Adams-Bashforth weights assume equal steps in sigma; on
# these geometric grids the step ratio differs from 1 by O(h), which leaves second order. UniPC-2: UniP-2 plus
# the UniC corrector is third order (UniC-p raises the order of the update it corrects by one, Zhao et al.
# 2023).
ODE_CASES = [
    *((name, spec.fn, spec.order) for name, spec in samplers_for("ve").items() if not spec.stochastic),
    ("dpmpp_2m_heun", lambda d, x, s: sample_dpmpp_2m(d, x, s, solver_type="heun"), 2.0),
    ("unipc_bh1", lambda d, x, s: sample_unipc(d, x, s, solver_type="bh1"), 3.0),
]


@pytest.mark.parametrize("schedule", [log_uniform_sigmas, karras_sigmas], ids=["log_uniform", "karras"])
@pytest.mark.parametrize("name,sampler,order", ODE_CASES, ids=[c[0] for c in ODE_CASES])
def test_ode_samplers_converge_at_their_order(name: str, sampler, order: float, schedule) -> None:
    errors = ode_errors(sampler, schedule)
    slope = _slope(STEPS, errors)
    assert all(b < a for a, b in zip(errors[:-1], errors[1:], strict=True)), (name, errors)
    # Measured (log-uniform / Karras): euler, ddim -0.98 / -0.98; heun -2.04 / -2.03; dpmpp_2m -1.96 / -2.03;
    # plms -2.04 / -2.08; unipc bh2 -3.31 / -3.45, bh1 -3.22 / -3.33 (faster than 3 at the finest grids).
    tol = 0.45 if name.startswith("unipc") else 0.3
    assert abs(slope + order) <= tol, (name, slope, errors)


def test_euler_is_ddim_eta_zero_and_euler_ancestral_eta_one_is_ddpm() -> None:
    sigmas = log_uniform_sigmas(12)
    x = _x_T(64, SIGMA_MAX)
    assert torch.equal(sample_euler(gaussian_denoiser, x, sigmas), sample_ddim(gaussian_denoiser, x, sigmas))
    a = sample_euler_ancestral(gaussian_denoiser, x, sigmas, generator=torch.Generator().manual_seed(1))
    b = sample_ddpm(gaussian_denoiser, x, sigmas, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    c = sample_dpmpp_2m_sde(gaussian_denoiser, x, sigmas, eta=0.0)
    torch.testing.assert_close(c, sample_dpmpp_2m(gaussian_denoiser, x, sigmas), rtol=1e-12, atol=1e-12)


# Stochastic samplers: (name, sampler, weak order 1?). The sample mean stays MU exactly in expectation (every
# update is an affine combination with weights summing to 1 of quantities with mean MU, plus zero-mean noise);
# the variance error is the discretisation bias, first order for the ancestral / churned Euler samplers.
SDE_CASES = [
    *((name, spec.fn, spec.order == 1) for name, spec in samplers_for("ve").items() if spec.stochastic),
    ("euler_ancestral_eta_half", lambda d, x, s, **kw: sample_euler_ancestral(d, x, s, eta=0.5, **kw), True),
    ("euler_churn", lambda d, x, s, **kw: sample_euler(d, x, s, s_churn=5.0, **kw), True),
    ("heun_churn", lambda d, x, s, **kw: sample_heun(d, x, s, s_churn=5.0, **kw), False),
    (
        "dpmpp_2m_sde_heun",
        lambda d, x, s, **kw: sample_dpmpp_2m_sde(d, x, s, solver_type="heun", **kw),
        False,
    ),
    ("dpmpp_2m_sde_eta_half", lambda d, x, s, **kw: sample_dpmpp_2m_sde(d, x, s, eta=0.5, **kw), False),
]
N_SAMPLES = 65_536
SDE_STEPS = [8, 32, 128]


@pytest.mark.parametrize("name,sampler,first_order", SDE_CASES, ids=[c[0] for c in SDE_CASES])
def test_stochastic_samplers_reach_the_data_distribution(name: str, sampler, first_order: bool) -> None:
    target_var = S**2 + SIGMA_MIN**2  # exact marginal variance at the last sigma
    se_mean = math.sqrt(target_var / N_SAMPLES)  # Monte Carlo standard errors of the sample mean / variance
    se_var = target_var * math.sqrt(2.0 / N_SAMPLES)
    var_errors = []
    for steps in SDE_STEPS:
        x = _x_T(N_SAMPLES, SIGMA_MAX)
        out = sampler(
            gaussian_denoiser, x, log_uniform_sigmas(steps), generator=torch.Generator().manual_seed(1)
        )
        assert abs(float(out.mean()) - MU) <= 5 * se_mean, (name, steps)
        var_errors.append(float(out.var()) - target_var)
    # Measured var errors at 8 / 32 / 128 steps: ddpm -4.4e-2 / -1.6e-2 / -3.7e-3, euler churn -3.7e-2 /
    # -1.4e-2 / -3.3e-3, dpmpp_2m_sde +5.2e-3 / +9.1e-4 / +6.5e-4 (the last within Monte Carlo noise, se_var =
    # 5.0e-4).
    if first_order:
        slope = _slope(SDE_STEPS, [abs(e) for e in var_errors])
        assert -1.3 <= slope <= -0.6, (name, var_errors)
    else:
        assert abs(var_errors[-1]) <= 5 * se_var and abs(var_errors[0]) > abs(var_errors[-1]), (
            name,
            var_errors,
        )


def flow_denoiser(x: Tensor, t: Tensor) -> Tensor:
    """Exact E[x0 | x_t] for x_t = (1 - t) x0 + t eps, x0 ~ N(MU, S^2)."""
    return MU + (1 - t) * S**2 * (x - (1 - t) * MU) / ((1 - t) ** 2 * S**2 + t**2)


@pytest.mark.parametrize("name", samplers_for("flow"))
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_samplers_converge_at_their_order(shift: float, name: str) -> None:
    z = torch.randn(2048, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = MU + S * z  # the 1-D flow from N(0, 1) at t = 1 to N(MU, S^2) at t = 0 is affine
    errors = []
    for steps in STEPS:
        ts = get_sigmas_flow(steps, shift).double()
        errors.append(float((SAMPLERS[name].fn(flow_denoiser, z, ts) - exact).abs().max()))
    # flow_euler measured -1.00 (shift 1) and -0.98 (shift 3)
    assert abs(_slope(STEPS, errors) + SAMPLERS[name].order) <= 0.2, errors


class CountingDenoiser:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        self.calls += 1
        return gaussian_denoiser(x, sigma)


@pytest.mark.parametrize(
    "sampler,calls",
    [(sample_euler, 6), (sample_heun, 11), (sample_plms, 7), (sample_dpmpp_2m, 6), (sample_unipc, 6)],
)
def test_denoiser_calls_per_run(sampler, calls: int) -> None:
    """Six steps ending in 0: Heun 2N - 1 (the last step is Euler), PLMS N + 1 (its averaged first step)."""
    den = CountingDenoiser()
    sigmas = torch.cat([log_uniform_sigmas(5), torch.zeros(1, dtype=torch.float64)])
    out = sampler(den, _x_T(8, SIGMA_MAX), sigmas)
    assert den.calls == calls and torch.isfinite(out).all()


ALL_SAMPLERS = [spec.fn for spec in SAMPLERS.values()]


@pytest.mark.parametrize("sampler", ALL_SAMPLERS, ids=lambda f: f.__name__)
def test_samplers_reject_non_descending_sigmas(sampler) -> None:
    with pytest.raises(ValueError, match="strictly descending") as err:
        sampler(gaussian_denoiser, torch.zeros(2), torch.tensor([0.5, 0.9, 0.0]))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda x, s: sample_euler_ancestral(gaussian_denoiser, x, s, eta=1.5), "eta must be in"),
        (lambda x, s: sample_dpmpp_2m_sde(gaussian_denoiser, x, s, eta=-0.1), "eta and s_noise must be >= 0"),
        (
            lambda x, s: sample_dpmpp_2m_sde(gaussian_denoiser, x, s, solver_type="rk4"),
            "solver_type must be one of",
        ),
        (
            lambda x, s: sample_dpmpp_2m(gaussian_denoiser, x, s, solver_type="euler"),
            "solver_type must be one of",
        ),
        (lambda x, s: sample_unipc(gaussian_denoiser, x, s, solver_type="bh3"), "solver_type must be one of"),
        (lambda x, s: sample_unipc(gaussian_denoiser, x, s, order=4), "order must be 1, 2 or 3"),
        (
            lambda x, s: sample_euler(gaussian_denoiser, x, s, s_churn=-1.0),
            "s_churn and s_noise must be >= 0",
        ),
        (lambda x, s: sample_flow_euler(gaussian_denoiser, x, s * 2), "flow times must lie in"),
        (lambda x, s: get_sigmas_karras(10, 1.0, 0.5), "need 0 < sigma_min < sigma_max"),
        (lambda x, s: get_sigmas_flow(10, shift=0.0), "shift must be > 0"),
    ],
)
def test_bad_options_give_one_line_errors(call, match: str) -> None:
    with pytest.raises(ValueError, match=match) as err:
        call(torch.zeros(2), torch.tensor([0.9, 0.5, 0.0]))
    assert "\n" not in str(err.value)


def test_stochastic_samplers_are_reproducible_from_a_seed() -> None:
    sigmas = torch.cat([log_uniform_sigmas(6), torch.zeros(1, dtype=torch.float64)])
    x = _x_T(16, SIGMA_MAX)
    for sampler in [
        sample_euler_ancestral,
        sample_dpmpp_2m_sde,
        lambda *a, **k: sample_heun(*a, s_churn=3.0, **k),
    ]:
        a, b, c = (
            sampler(gaussian_denoiser, x, sigmas, generator=torch.Generator().manual_seed(s))
            for s in (3, 3, 4)
        )
        assert torch.equal(a, b) and not torch.allclose(a, c)
