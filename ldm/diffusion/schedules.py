"""Discrete variance-preserving noise schedules (DDPM, Ho et al. 2020) and their sigma view.

A VP schedule defines abar_t = prod_{s<=t} (1 - beta_s) and x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps.
Dividing by sqrt(abar_t) gives the variance-exploding view x = x0 + sigma_t eps with
sigma_t = sqrt((1 - abar_t) / abar_t) (Karras et al. 2022, "EDM", Sec. 2 / Table 1), which is the coordinate
system that ``Denoiser`` and the samplers in ``ldm.sampling`` work in.
"""

from __future__ import annotations

import torch
from torch import Tensor

BETA_SCHEDULES = ("linear", "scaled_linear")


def _float_dtype(x: Tensor) -> torch.dtype:
    """float64 stays float64; every other dtype (ints, halves, float32) gives float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _work_dtype(device: torch.device) -> torch.dtype:
    """float64 for the interpolation maths, except on backends without float64 (Apple MPS)."""
    return torch.float32 if device.type == "mps" else torch.float64


class DiscreteSchedule:
    """DDPM discrete VP schedule with T training timesteps t = 0..T-1 (Ho et al. 2020, Sec. 4).

    ``beta_schedule="linear"`` spaces beta linearly (DDPM); ``"scaled_linear"`` spaces sqrt(beta) linearly,
    the latent-diffusion / Stable Diffusion schedule (Rombach et al. 2022). All tables are float64 on CPU.
    """

    def __init__(
        self,
        num_timesteps: int = 1000,
        beta_schedule: str = "scaled_linear",
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
    ) -> None:
        if num_timesteps < 2:
            raise ValueError(f"num_timesteps must be >= 2, got {num_timesteps}; use e.g. 1000.")
        if beta_schedule not in BETA_SCHEDULES:
            raise ValueError(f"beta_schedule must be one of {BETA_SCHEDULES}, got {beta_schedule!r}.")
        if not 0.0 < beta_start < beta_end < 1.0:
            raise ValueError(f"need 0 < beta_start < beta_end < 1, got {beta_start=} {beta_end=}.")
        self.num_timesteps = num_timesteps
        self.beta_schedule = beta_schedule
        self.beta_start = beta_start
        self.beta_end = beta_end

        t = num_timesteps
        if beta_schedule == "linear":
            betas = torch.linspace(beta_start, beta_end, t, dtype=torch.float64)  # (T,)
        else:
            betas = torch.linspace(beta_start**0.5, beta_end**0.5, t, dtype=torch.float64) ** 2  # (T,)
        self.betas: Tensor = betas  # (T,)
        self.alphas_cumprod: Tensor = torch.cumprod(1.0 - betas, dim=0)  # (T,) abar_t, Ho et al. eq. 4
        self.sigmas: Tensor = ((1.0 - self.alphas_cumprod) / self.alphas_cumprod).sqrt()  # (T,) ascending
        self.log_sigmas: Tensor = self.sigmas.log()  # (T,)
        self.sigma_min = float(self.sigmas[0])
        self.sigma_max = float(self.sigmas[-1])

    def __repr__(self) -> str:
        return (
            f"DiscreteSchedule(num_timesteps={self.num_timesteps}, beta_schedule={self.beta_schedule!r}, "
            f"beta_start={self.beta_start}, beta_end={self.beta_end})"
        )

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        """Continuous timestep for sigma, by linear interpolation of t in log-sigma (k-diffusion convention).

        Grid sigmas map to exact integers, also when given in float32 (a sigma equal to a grid value rounded to
        its own dtype returns that grid index). Sigmas outside [sigma_min, sigma_max] clamp to t in [0, T-1].
        Output: same shape and device as ``sigma``; float64 if sigma is float64, else float32.
        """
        work = _work_dtype(sigma.device)
        log_grid = self.log_sigmas.to(device=sigma.device, dtype=work)  # (T,) ascending
        log_sigma = sigma.to(work).log()  # (...)
        flat = log_sigma.reshape(-1)  # (N,)
        high = torch.searchsorted(log_grid, flat).clamp(1, self.num_timesteps - 1)  # (N,)
        low = high - 1
        lo, hi = log_grid[low], log_grid[high]
        w = ((flat - lo) / (hi - lo)).clamp(0.0, 1.0)  # (N,) fraction of the way from low to high
        t = low.to(work) + w  # (N,)
        if sigma.dtype in (torch.float32, torch.float64):
            grid = self.sigmas.to(device=sigma.device, dtype=sigma.dtype)  # (T,)
            hits = sigma.reshape(-1, 1) == grid.reshape(1, -1)  # (N, T)
            index = hits.to(torch.int64).argmax(dim=1).to(work)  # (N,)
            t = torch.where(hits.any(dim=1), index, t)
        return t.reshape(sigma.shape).to(_float_dtype(sigma))

    def t_to_sigma(self, t: Tensor) -> Tensor:
        """sigma at continuous timestep t (log-linear interpolation between grid points; exact on the grid).

        Output: same shape and device as ``t``; float64 if t is float64, else float32.
        """
        work = _work_dtype(t.device)
        t_work = t.to(work).clamp(0.0, self.num_timesteps - 1)  # (...)
        low = t_work.floor().to(torch.int64)  # (...)
        high = (low + 1).clamp(max=self.num_timesteps - 1)  # (...)
        w = t_work - low.to(work)  # (...) in [0, 1), exactly 0 on the grid
        sigmas = self.sigmas.to(device=t.device, dtype=work)  # (T,)
        log_sigmas = self.log_sigmas.to(device=t.device, dtype=work)  # (T,)
        # sigma_low * exp(w * (log sigma_high - log sigma_low)) == exp of the interpolated log-sigma
        sigma = sigmas[low] * torch.exp(w * (log_sigmas[high] - log_sigmas[low]))
        return sigma.to(_float_dtype(t))
