"""Samplers in VE coordinates x = x0 + sigma * eps (Karras et al. 2022; k-diffusion calling convention).

Each sampler is a pure function ``sample_*(denoiser, x, sigmas, *, extra_args, callback, generator)``:
``denoiser(x, sigma_batch, **extra_args)`` returns the x0 estimate, ``x`` is the initial noise already scaled
by ``schedule.init_noise_scale(sigmas[0])`` and ``sigmas`` is a descending 1-D schedule that normally ends
in 0. The final x (at sigma = 0) is the clean sample.

DDIM / DDPM are the discrete-time updates rewritten with sigma_t = sqrt((1 - abar_t) / abar_t): dividing
Song et al. 2021, eq. 12 by sqrt(abar_{t'}) gives x' = x0 + sigma_down * eps + sigma_up * z with
    sigma_up = eta * sqrt(sigma'^2 (sigma^2 - sigma'^2) / sigma^2),  sigma_down = sqrt(sigma'^2 - sigma_up^2)
(their eq. 16 for the variance), and eta = 1 is the DDPM posterior (Ho et al. 2020, eqs. 6-7). Since
x0 + sigma_down * eps = x + (sigma_down - sigma) * (x - x0) / sigma, this is an Euler step of the
probability-flow ODE dx/dsigma = (x - D(x; sigma)) / sigma (Karras et al. 2022, eq. 4 with s = 1) down to
sigma_down followed by fresh noise: ``euler_loop`` below is shared by DDIM, DDPM, Euler (with Karras' churn)
and Euler ancestral.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

Denoiser = Callable[..., Tensor]
Callback = Callable[[dict], None]


def check_sigmas(sigmas: Tensor) -> list[float]:
    """Validate a 1-D descending schedule and return it as Python floats (float64 coefficient maths)."""
    if sigmas.ndim != 1 or sigmas.numel() < 2:
        raise ValueError(
            f"sigmas must be 1-D with >= 2 entries, got shape {tuple(sigmas.shape)}; "
            "use ldm.sampling.sigmas.get_sigmas_discrete."
        )
    values = sigmas.detach().double().cpu().tolist()
    if any(b >= a for a, b in zip(values[:-1], values[1:], strict=True)) or values[-1] < 0:
        raise ValueError("sigmas must be strictly descending and >= 0; use get_sigmas_discrete (ends in 0).")
    return values


def noise_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """N(0, I) like x, drawn on the generator's device (reproducible across devices), then moved to x."""
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device).to(x)


def ancestral_step(sigma: float, sigma_next: float, eta: float) -> tuple[float, float]:
    """(sigma_down, sigma_up) of a DDIM step sigma -> sigma_next (Song et al. 2021, eqs. 12 and 16, VE
    form)."""
    if sigma_next == 0.0 or eta == 0.0:
        return sigma_next, 0.0
    sigma_up = eta * math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2)
    return math.sqrt(sigma_next**2 - sigma_up**2), sigma_up


def denoise(denoiser: Denoiser, x: Tensor, sigma: Tensor, extra_args: dict | None) -> Tensor:
    """One denoiser call with sigma broadcast to the batch: (B, ...) -> x0 estimate (B, ...)."""
    sigma_batch = sigma.expand(x.shape[0])  # (B,)
    return denoiser(x, sigma_batch, **(extra_args or {}))


def check_eta(eta: float) -> None:
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be in [0, 1] (0 = deterministic DDIM, 1 = DDPM), got {eta}.")


def check_churn(s_churn: float, s_noise: float) -> None:
    if s_churn < 0.0 or s_noise < 0.0:
        raise ValueError(
            f"s_churn and s_noise must be >= 0, got {s_churn=} {s_noise=}; use s_churn=0 for none."
        )


def churn(
    x: Tensor,
    sigmas_dev: Tensor,
    i: int,
    gamma: float,
    s_noise: float,
    generator: torch.Generator | None,
) -> tuple[Tensor, float, Tensor]:
    """Karras et al. 2022, Alg. 2 lines 4-7: raise the noise level to sigma_hat = (1 + gamma) sigma.

    Returns (x_hat, sigma_hat as a float, sigma_hat as a tensor for the denoiser). With gamma = 0 nothing is
    drawn and the schedule's own tensor entry is returned, so grid sigmas reach the net bit-exactly.
    """
    sigma = float(sigmas_dev[i])
    if gamma <= 0.0:
        return x, sigma, sigmas_dev[i]
    sigma_hat = sigma * (1.0 + gamma)
    x = x + math.sqrt(sigma_hat**2 - sigma**2) * s_noise * noise_like(x, generator)  # (B, ...)
    return x, sigma_hat, sigmas_dev.new_tensor(sigma_hat)


def churn_gamma(s_churn: float, steps: int, sigma: float, s_tmin: float, s_tmax: float) -> float:
    """gamma_i = min(S_churn / N, sqrt(2) - 1) for sigma in [S_tmin, S_tmax], else 0 (Karras et al. 2022, Alg.
    2)."""
    if s_churn <= 0.0 or not s_tmin <= sigma <= s_tmax:
        return 0.0
    return min(s_churn / steps, math.sqrt(2.0) - 1.0)


def euler_loop(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    eta: float,
    s_noise: float,
    s_churn: float,
    s_tmin: float,
    s_tmax: float,
    extra_args: dict | None,
    callback: Callback | None,
    generator: torch.Generator | None,
) -> Tensor:
    """Per step: optional churn (Karras Alg. 2), Euler step to sigma_down, then sigma_up * s_noise * z (eta >
    0).

    Noise order per step: the churn draw (only when gamma > 0) before the denoiser call, the ancestral draw
    (only when sigma_up > 0, i.e. eta > 0 and sigma_next > 0) after it.
    """
    values = check_sigmas(sigmas)
    sigmas_dev = sigmas.to(x.device)  # (N+1,)
    steps = len(values) - 1
    for i in range(steps):
        gamma = churn_gamma(s_churn, steps, values[i], s_tmin, s_tmax)
        x, sigma_hat, sigma_hat_t = churn(x, sigmas_dev, i, gamma, s_noise, generator)
        denoised = denoise(denoiser, x, sigma_hat_t, extra_args)  # (B, ...)
        if callback is not None:
            callback({"i": i, "x": x, "sigma": sigmas_dev[i], "sigma_hat": sigma_hat_t, "denoised": denoised})
        sigma_down, sigma_up = ancestral_step(sigma_hat, values[i + 1], eta)
        d = (x - denoised) / sigma_hat  # (B, ...) dx/dsigma = eps implied by the x0 estimate (Karras eq. 4)
        x = denoised + sigma_down * d  # (B, ...) = x + (sigma_down - sigma_hat) d, Song et al. eq. 12
        if sigma_up > 0.0:
            x = x + sigma_up * s_noise * noise_like(x, generator)
    return x


@torch.no_grad()
def sample_ddim(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    eta: float = 0.0,
    extra_args: dict | None = None,
    callback: Callback | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """DDIM (Song et al. 2021, eq. 12); eta = 0 is deterministic, eta = 1 matches DDPM. x (B, ...).

    The same update as ``sample_euler`` (eta = 0) and ``sample_euler_ancestral`` (eta > 0); one draw per step.
    """
    check_eta(eta)
    return euler_loop(
        denoiser,
        x,
        sigmas,
        eta=eta,
        s_noise=1.0,
        s_churn=0.0,
        s_tmin=0.0,
        s_tmax=math.inf,
        extra_args=extra_args,
        callback=callback,
        generator=generator,
    )


@torch.no_grad()
def sample_ddpm(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra_args: dict | None = None,
    callback: Callback | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Ancestral DDPM: sample the posterior q(x_{t'} | x_t, x0_hat) (Ho et al. 2020, eqs. 6-7) on any
    sub-grid.

    In VE form with r = sigma'^2 / sigma^2: mean = r x + (1 - r) x0_hat, variance = sigma'^2 (1 - r). On a
    strided grid this uses beta_t = 1 - abar_t / abar_t' like diffusers' DDPMScheduler ("fixed_small"
    variance).
    """
    # With eta = 1 the DDIM step x' = x0 + sigma_down * eps + sigma_up * z has mean r x + (1 - r) x0 and
    # variance sigma'^2 (1 - r): exactly this posterior, so one loop serves both samplers.
    return sample_ddim(
        denoiser, x, sigmas, eta=1.0, extra_args=extra_args, callback=callback, generator=generator
    )
