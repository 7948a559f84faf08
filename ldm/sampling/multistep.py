"""Multistep samplers in VE coordinates x = x0 + sigma * eps: PLMS, DPM-Solver++(2M) (ODE and SDE) and UniPC.

Multistep methods reuse earlier denoiser outputs, so one call per step buys a higher order. The exponential
integrators (DPM-Solver++, UniPC) are written in the VP papers with lambda = log(alpha / sigma_VP); dividing
their updates by alpha_{t'} gives the VE form used here with lambda = -log(sigma), step h = lambda' - lambda =
log(sigma / sigma') and e^{-h} = sigma' / sigma. The step to sigma = 0 (h = inf) is always first order and
returns the last x0 estimate. Coefficients are float64 Python floats; tensors keep x's dtype.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ldm.sampling.samplers import Callback, Denoiser, check_sigmas, denoise, noise_like
from ldm.sampling.solvers import heun_step

SOLVER_TYPES = ("midpoint", "heun")
UNIPC_VARIANTS = ("bh1", "bh2")

# Adams-Bashforth weights on [newest, ..., oldest] eps (the PLMS update of Liu et al. 2022).
_ADAMS_BASHFORTH = (
    (1.0,),
    (3 / 2, -1 / 2),
    (23 / 12, -16 / 12, 5 / 12),
    (55 / 24, -59 / 24, 37 / 24, -9 / 24),
)


@torch.no_grad()
def sample_plms(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra_args: dict | None = None,
    callback: Callback | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Pseudo linear multistep (PNDM, Liu et al. 2022) as diffusers' PNDMScheduler(skip_prk_steps=True) runs
    it.

    PNDM's transfer part (their eq. 9) is the DDIM step, i.e. x' = x + (sigma' - sigma) * eps in VE form; the
    gradient part replaces eps by an Adams-Bashforth combination of the last (up to) four eps estimates. The
    first step has no history: it is an Euler step, a second call at its end point and a redo with the average
    of both eps (a Heun step; diffusers' "repeated second timestep"), whose end-point eps is then dropped from
    the history. N + 1 denoiser calls for N steps (N = 1: one Euler step). ``generator`` is unused.

    diffusers steps each listed timestep t to t - T // N. ``get_sigmas_discrete(schedule, N, "leading",
    steps_offset)`` (and "trailing" when N divides T) is exactly that list, ending at abar = 1 (sigma 0) as
    with ``set_alpha_to_one=True``; for ``set_alpha_to_one=False`` (Stable Diffusion) replace the final 0 by
    ``schedule.sigma_min``. Other spacings make diffusers step off its own list, which no sigma list
    expresses. For v-prediction nets diffusers averages the raw v outputs; this averages the implied eps
    (parameterisation-free).
    """
    values = check_sigmas(sigmas)
    sigmas_dev = sigmas.to(x.device)  # (N+1,)
    steps = len(values) - 1
    history: list[Tensor] = []  # eps estimates, oldest first, at most 4
    for i in range(steps):
        denoised = denoise(denoiser, x, sigmas_dev[i], extra_args)  # (B, ...)
        if callback is not None:
            callback({"i": i, "x": x, "sigma": sigmas_dev[i], "denoised": denoised})
        eps = (x - denoised) / values[i]  # (B, ...)
        history = (history + [eps])[-4:]
        if i == 0 and steps > 1:
            x = heun_step(denoiser, x, eps, values[0], sigmas_dev[1], extra_args)
            continue
        weights = _ADAMS_BASHFORTH[len(history) - 1]
        eps_ab = sum(w * e for w, e in zip(weights, reversed(history), strict=True))  # (B, ...)
        x = x + (values[i + 1] - values[i]) * eps_ab
    return x


def _check_solver_type(solver_type: str) -> None:
    if solver_type not in SOLVER_TYPES:
        raise ValueError(f"solver_type must be one of {SOLVER_TYPES}, got {solver_type!r}.")


def _dpmpp_2m_loop(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    eta: float,
    s_noise: float,
    solver_type: str,
    extra_args: dict | None,
    callback: Callback | None,
    generator: torch.Generator | None,
) -> Tensor:
    """(SDE-)DPM-Solver++(2M) in VE form; eta = 0 is the ODE solver, eta = 1 diffusers' "sde-dpmsolver++".

    With H = (1 + eta) h and D1 = (D_i - D_{i-1}) * h / h_{i-1} (a finite difference of the x0 estimates in
    lambda):
        x' = (sigma' / sigma) e^{-eta h} x + (1 - e^{-H}) D_i + c * D1
             + sigma' sqrt(1 - e^{-2 eta h}) s_noise z
    where c = (1 - e^{-H}) / 2 ("midpoint") or 1 - (1 - e^{-H}) / H ("heun", the exact integral of the linear
    interpolant of D in lambda against the exponential weight). eta = 0: Lu et al. 2022 (DPM-Solver++),
    Alg. 2. The first step and the step to sigma = 0 are first order (c = 0); the noise keeps the marginals
    N(x0, sigma^2) for any eta >= 0. One draw per step after the denoiser call, none on the step to 0.
    """
    values = check_sigmas(sigmas)
    sigmas_dev = sigmas.to(x.device)  # (N+1,)
    old_denoised: Tensor | None = None
    h_last = math.nan
    for i in range(len(values) - 1):
        sigma, sigma_next = values[i], values[i + 1]
        denoised = denoise(denoiser, x, sigmas_dev[i], extra_args)  # (B, ...)
        if callback is not None:
            callback({"i": i, "x": x, "sigma": sigmas_dev[i], "denoised": denoised})
        if sigma_next == 0.0:
            x = denoised  # h = inf: first order, x' = D_i
            continue
        h = math.log(sigma / sigma_next)
        big_h = (1.0 + eta) * h
        one_minus = -math.expm1(-big_h)  # 1 - e^{-H}
        x = (sigma_next / sigma) * math.exp(-eta * h) * x + one_minus * denoised  # (B, ...)
        if old_denoised is not None:
            d1 = (denoised - old_denoised) * (h / h_last)  # (B, ...) D1 / r with r = h_last / h
            coef = 0.5 * one_minus if solver_type == "midpoint" else 1.0 - one_minus / big_h
            x = x + coef * d1
        if eta > 0.0:
            x = x + sigma_next * math.sqrt(-math.expm1(-2.0 * eta * h)) * s_noise * noise_like(x, generator)
        old_denoised, h_last = denoised, h
    return x


@torch.no_grad()
def sample_dpmpp_2m(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    solver_type: str = "midpoint",
    extra_args: dict | None = None,
    callback: Callback | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Alg. 2; data prediction, multistep). x (B, ...).

    One call per step; the first step and the step to 0 are first order (= DDIM). ``generator`` is unused.
    """
    _check_solver_type(solver_type)
    return _dpmpp_2m_loop(
        denoiser,
        x,
        sigmas,
        eta=0.0,
        s_noise=1.0,
        solver_type=solver_type,
        extra_args=extra_args,
        callback=callback,
        generator=generator,
    )


@torch.no_grad()
def sample_dpmpp_2m_sde(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    eta: float = 1.0,
    s_noise: float = 1.0,
    solver_type: str = "midpoint",
    extra_args: dict | None = None,
    callback: Callback | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """SDE-DPM-Solver++(2M), the stochastic variant of Lu et al. 2022 ("DPM-Solver++"); eta scales the noise.

    eta = 1 is diffusers' DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++"); eta = 0 is
    ``sample_dpmpp_2m``. One draw per step after the denoiser call, none on the step to 0. x (B, ...).
    """
    _check_solver_type(solver_type)
    if eta < 0.0 or s_noise < 0.0:
        raise ValueError(f"eta and s_noise must be >= 0 (eta = 0 is the ODE solver), got {eta=} {s_noise=}.")
    return _dpmpp_2m_loop(
        denoiser,
        x,
        sigmas,
        eta=eta,
        s_noise=s_noise,
        solver_type=solver_type,
        extra_args=extra_args,
        callback=callback,
        generator=generator,
    )


def _unipc_rhs(hh: float, order: int, b_h: float) -> list[float]:
    """b_k = k! * hh * phi_{k+1}(hh) / B(h), k = 1..order (Zhao et al. 2023, Sec. 3; phi_1(z) = (e^z - 1) /
    z)."""
    g = (
        math.expm1(hh) / hh - 1.0
    )  # hh * phi_2(hh); then hh * phi_{k+2} = (hh * phi_{k+1}) / hh - 1 / (k + 1)!
    factorial, rhs = 1.0, []
    for k in range(1, order + 1):
        rhs.append(g * factorial / b_h)
        factorial *= k + 1
        g = g / hh - 1.0 / factorial
    return rhs


def _solve(matrix: list[list[float]], rhs: list[float]) -> list[float]:
    """Solve the (order x order) Vandermonde-type system of UniPC in float64."""
    a = torch.tensor(matrix, dtype=torch.float64)
    b = torch.tensor(rhs, dtype=torch.float64)
    return torch.linalg.solve(a, b).tolist()


def _unipc_weights(nodes: list[float], hh: float, b_h: float) -> list[float]:
    """Weights a of the scaled differences D1_k at nodes r_k: solve sum_k a_k r_k^(j-1) = b_j, j =
    1..len(nodes).

    UniP-p uses the p - 1 earlier nodes, UniC-p those plus r = 1 (the new point). With a single node the
    reference implementation fixes a = 1/2 for either B(h) (UniP-2, UniC-1), and so does this one.
    """
    if len(nodes) == 1:
        return [0.5]
    matrix = [[r**j for r in nodes] for j in range(len(nodes))]
    return _solve(matrix, _unipc_rhs(hh, len(nodes), b_h))


def _unipc_update(
    x: Tensor,
    sigma: float,
    sigma_next: float,
    lambdas: list[float],
    outputs: list[Tensor],
    order: int,
    variant: str,
    new_output: Tensor | None,
) -> Tensor:
    """One UniP step (new_output None) or UniC correction (new_output = D at the predicted x'), VE form.

    x (B, ...) at ``sigma``; ``lambdas`` / ``outputs`` are the -log sigma and x0 estimates up to and including
    ``sigma``, oldest first. With r_k = (lambda_{-k} - lambda) / h and D1_k = (D_{-k} - D_0) / r_k:
        x' = e^{-h} x + (1 - e^{-h}) D_0 - B(h) sum_k a_k D1_k
    over the p - 1 earlier points (UniP-p), plus the point x' itself (r = 1, D1 = D_new - D_0) for UniC-p.
    """
    lam, lam_next = lambdas[-1], -math.log(sigma_next)
    h = lam_next - lam
    hh = -h  # data prediction
    b_h = hh if variant == "bh1" else math.expm1(hh)
    m0 = outputs[-1]
    nodes = [(lambdas[-1 - k] - lam) / h for k in range(1, order)]
    diffs = [(outputs[-1 - k] - m0) / r for k, r in enumerate(nodes, start=1)]  # (B, ...) each
    x_next = (sigma_next / sigma) * x - math.expm1(hh) * m0  # (B, ...) first-order (DDIM) part
    if new_output is not None:
        nodes, diffs = nodes + [1.0], diffs + [new_output - m0]
    if not nodes:
        return x_next
    weights = _unipc_weights(nodes, hh, b_h)
    return x_next - b_h * sum(w * d for w, d in zip(weights, diffs, strict=True))


@torch.no_grad()
def sample_unipc(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    order: int = 2,
    solver_type: str = "bh2",
    extra_args: dict | None = None,
    callback: Callback | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """UniPC (Zhao et al. 2023): UniP-p predictor + UniC corrector, data prediction, B(h) = "bh1" | "bh2".

    As diffusers' UniPCMultistepScheduler(predict_x0=True, lower_order_final=True): step i uses order
    min(order, i + 1, N - i) (warm-up and lower order at the end), and at each step after the first the x
    predicted by the previous step is corrected with the denoiser output at it (no extra call: that output
    also enters the history). The last step (to 0) is not corrected. N calls for N steps. ``generator`` is
    unused. The step to sigma = 0 returns the last x0 estimate (the h -> inf limit; diffusers gives NaN there
    for "bh1").
    """
    if order not in (1, 2, 3):
        raise ValueError(f"order must be 1, 2 or 3, got {order}.")
    if solver_type not in UNIPC_VARIANTS:
        raise ValueError(
            f"solver_type must be one of {UNIPC_VARIANTS} (the B(h) choice), got {solver_type!r}."
        )
    values = check_sigmas(sigmas)
    sigmas_dev = sigmas.to(x.device)  # (N+1,)
    steps = len(values) - 1
    lambdas: list[float] = []
    outputs: list[Tensor] = []
    x_last, last_order = x, 0
    for i in range(steps):
        denoised = denoise(denoiser, x, sigmas_dev[i], extra_args)  # (B, ...) at the predicted x
        if callback is not None:
            callback({"i": i, "x": x, "sigma": sigmas_dev[i], "denoised": denoised})
        if i > 0:  # UniC: correct x_i with the output at the predicted x_i
            x = _unipc_update(
                x_last, values[i - 1], values[i], lambdas, outputs, last_order, solver_type, denoised
            )
        lambdas = (lambdas + [-math.log(values[i])])[-order:]
        outputs = (outputs + [denoised])[-order:]
        last_order = min(order, i + 1, steps - i)
        x_last = x
        if values[i + 1] == 0.0:
            x = denoised  # UniP-1 to sigma = 0
        else:
            x = _unipc_update(x, values[i], values[i + 1], lambdas, outputs, last_order, solver_type, None)
    return x
