"""Single-step ODE / SDE samplers of Karras et al. 2022 ("EDM") and rectified-flow Euler, VE coordinates.

All integrate the probability-flow ODE dx/dsigma = d(x, sigma) = (x - D(x; sigma)) / sigma (Karras et al.
2022, eq. 4 with s(t) = 1, sigma(t) = t), optionally with Karras' "churn" (Alg. 2): before step i the noise
level is raised to sigma_hat = (1 + gamma_i) sigma_i by adding sqrt(sigma_hat^2 - sigma_i^2) * s_noise * z, z
~ N(0, I).

Plain Euler, DDIM (eta = 0) and Euler ancestral share one loop (``samplers.euler_loop``): in VE form the DDIM
update x0 + sigma' * eps is exactly the Euler step x + (sigma' - sigma) d.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ldm.sampling.samplers import (
    Callback,
    Denoiser,
    check_churn,
    check_eta,
    check_sigmas,
    churn,
    churn_gamma,
    denoise,
    euler_loop,
)


@torch.no_grad()
def sample_euler(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = math.inf,
    s_noise: float = 1.0,
    extra_args: dict | None = None,
    callback: Callback | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Euler (Karras et al. 2022, Alg. 2 without the second-order correction). x (B, ...).

    s_churn = 0 is the deterministic Euler method, the same update as ``sample_ddim(eta=0)``. With churn the
    denoiser sees the churned x_hat at sigma_hat (Alg. 2), one draw per churned step before the denoiser call.
    (diffusers' EulerDiscreteScheduler instead calls the net on the un-churned x at sigma and adds the churn
    afterwards, so churned runs differ from it; s_churn = 0 matches it.)
    """
    check_churn(s_churn, s_noise)
    return euler_loop(
        denoiser,
        x,
        sigmas,
        eta=0.0,
        s_noise=s_noise,
        s_churn=s_churn,
        s_tmin=s_tmin,
        s_tmax=s_tmax,
        extra_args=extra_args,
        callback=callback,
        generator=generator,
    )


@torch.no_grad()
def sample_euler_ancestral(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    eta: float = 1.0,
    s_noise: float = 1.0,
    extra_args: dict | None = None,
    callback: Callback | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Euler ancestral: Euler step to sigma_down, then add sigma_up * s_noise * z (``ancestral_step``). x (B,
    ...).

    This is the DDIM update with the same eta (eta = 1: DDPM's posterior sample, like ``sample_ddpm``); one
    draw per step after the denoiser call, none on the step to sigma = 0.
    """
    check_eta(eta)
    check_churn(0.0, s_noise)
    return euler_loop(
        denoiser,
        x,
        sigmas,
        eta=eta,
        s_noise=s_noise,
        s_churn=0.0,
        s_tmin=0.0,
        s_tmax=math.inf,
        extra_args=extra_args,
        callback=callback,
        generator=generator,
    )


def heun_step(
    denoiser: Denoiser,
    x: Tensor,
    d: Tensor,
    sigma: float,
    sigma_next: Tensor,
    extra_args: dict | None,
) -> Tensor:
    """Trapezoidal correction of an Euler step sigma -> sigma_next > 0 (Karras et al. 2022, Alg. 1 lines 6-8).

    x (B, ...) at ``sigma``, d (B, ...) its slope; sigma_next is the schedule's tensor entry (passed to the
    net).
    """
    h = float(sigma_next) - sigma
    x_euler = x + h * d  # (B, ...) Euler predictor
    denoised_next = denoise(denoiser, x_euler, sigma_next, extra_args)  # (B, ...)
    d_next = (x_euler - denoised_next) / float(sigma_next)  # (B, ...)
    return x + h * 0.5 * (d + d_next)  # (B, ...)


@torch.no_grad()
def sample_heun(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = math.inf,
    s_noise: float = 1.0,
    extra_args: dict | None = None,
    callback: Callback | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Heun's second-order method (Karras et al. 2022, Alg. 1; with churn, Alg. 2). x (B, ...).

    Two denoiser calls per step except the last step to sigma = 0, which is an Euler step (Alg. 1 line 6):
    2N - 1 calls for N steps ending in 0. One churn draw per churned step, before the first call.
    """
    check_churn(s_churn, s_noise)
    values = check_sigmas(sigmas)
    sigmas_dev = sigmas.to(x.device)  # (N+1,)
    steps = len(values) - 1
    for i in range(steps):
        gamma = churn_gamma(s_churn, steps, values[i], s_tmin, s_tmax)
        x, sigma_hat, sigma_hat_t = churn(x, sigmas_dev, i, gamma, s_noise, generator)
        denoised = denoise(denoiser, x, sigma_hat_t, extra_args)  # (B, ...)
        if callback is not None:
            callback({"i": i, "x": x, "sigma": sigmas_dev[i], "sigma_hat": sigma_hat_t, "denoised": denoised})
        d = (x - denoised) / sigma_hat  # (B, ...) Karras eq. 4
        if values[i + 1] == 0.0:
            x = denoised  # Euler step to sigma = 0: x + (0 - sigma_hat) d
        else:
            x = heun_step(denoiser, x, d, sigma_hat, sigmas_dev[i + 1], extra_args)
    return x


@torch.no_grad()
def sample_flow_euler(
    denoiser: Denoiser,
    x: Tensor,
    ts: Tensor,
    *,
    extra_args: dict | None = None,
    callback: Callback | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Euler for rectified flow x_t = (1 - t) x0 + t eps (Esser et al. 2024, "SD3", Sec. 2-3). x (B, ...).

    ``ts`` descends from (normally) 1 to 0, ``x`` is N(0, I) noise (no scaling) and ``denoiser(x, t_batch)``
    returns the x0 estimate. The velocity v = dx/dt = eps - x0 = (x - x0) / t and the step x' = x + (t' - t) v
    are the VE Euler step with sigma replaced by t, so the loop is the one of ``sample_euler``. ``generator``
    is unused.
    """
    if float(ts.max()) > 1.0:
        raise ValueError(f"flow times must lie in [0, 1], got max {float(ts.max())}; use get_sigmas_flow.")
    return euler_loop(
        denoiser,
        x,
        ts,
        eta=0.0,
        s_noise=1.0,
        s_churn=0.0,
        s_tmin=0.0,
        s_tmax=math.inf,
        extra_args=extra_args,
        callback=callback,
        generator=generator,
    )
