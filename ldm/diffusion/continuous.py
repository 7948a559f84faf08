"""Continuous-time noise schedules: EDM (Karras et al. 2022) and rectified flow (Liu et al. 2023; SD3, Esser
et al. 2024).

Both implement the noise-schedule interface of ``DiscreteSchedule``: the net sees
``a * x = alpha * x0 + s * eps`` (``coefficients``), is told the noise level through ``c_noise``, draws
training noise levels through ``sigma_at_fraction`` (u in [0, 1)) or directly in sigma, and starts sampling
from ``init_noise_scale`` * N(0, I).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ldm.tensors import float_dtype, work_dtype


def shift_time(t, shift: float):
    """t -> shift t / (1 + (shift - 1) t) (Esser et al. 2024, SD3, eq. 23); tensors, arrays or floats."""
    return shift * t / (1.0 + (shift - 1.0) * t)


class EDMSchedule:
    """Variance-exploding x = x0 + sigma * eps with EDM preconditioning (Karras et al. 2022, Table 1, "EDM").

    c_in = 1 / sqrt(sigma^2 + sigma_data^2), c_noise = (1/4) ln(sigma) * ``c_noise_scale``. Our UNet's
    sinusoidal embedding is built for timesteps in 0..1000, so the default scale 1000 stretches EDM's (1/4)
    ln(sigma) (about -1.6..1.1) over a comparable range; c_noise_scale=1 is the paper's value.
    """

    space = "ve"
    spacings = ("karras",)  # sampling grid (ldm.sampling.grids): EDM's rho schedule
    default_spacing = "karras"

    def __init__(
        self,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        sigma_data: float = 0.5,
        c_noise_scale: float = 1000.0,
    ) -> None:
        if not 0.0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min=} {sigma_max=}.")
        if sigma_data <= 0.0:
            raise ValueError(f"sigma_data must be > 0 (the data's standard deviation), got {sigma_data}.")
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        self.sigma_data = float(sigma_data)
        self.c_noise_scale = float(c_noise_scale)
        self.alpha_min = float(
            (self.sigma_max**2 + self.sigma_data**2) ** -0.5
        )  # signal coefficient at sigma_max

    def __repr__(self) -> str:
        return (
            f"EDMSchedule(sigma_min={self.sigma_min}, sigma_max={self.sigma_max}, "
            f"sigma_data={self.sigma_data}, c_noise_scale={self.c_noise_scale})"
        )

    def coefficients(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(a, alpha, s) = (c_in, c_in, sigma * c_in): a * x = c_in * x0 + c_in * sigma * eps."""
        sigma = sigma.to(work_dtype(sigma.device))
        c_in = (sigma**2 + self.sigma_data**2).rsqrt()
        return c_in, c_in, sigma * c_in

    def c_noise(self, sigma: Tensor) -> Tensor:
        """(1/4) ln(sigma), times ``c_noise_scale`` (EDM Table 1)."""
        return (0.25 * self.c_noise_scale * sigma.to(work_dtype(sigma.device)).log()).to(float_dtype(sigma))

    def sigma_at_fraction(self, u: Tensor) -> Tensor:
        """u in [0, 1) -> sigma log-uniform on [sigma_min, sigma_max]."""
        lo, hi = math.log(self.sigma_min), math.log(self.sigma_max)
        return torch.exp(lo + u.to(work_dtype(u.device)) * (hi - lo))

    def init_noise_scale(self, sigma: float) -> float:
        """x_N = sigma_max * N(0, I) (EDM Algorithm 1, line 1)."""
        return float(sigma)


class FlowSchedule:
    """Rectified flow x_t = (1 - t) x0 + t eps, t in [0, 1] (Liu et al. 2023; Esser et al. 2024, Sec. 2-3).

    Samplers work in these coordinates directly (``space = "flow"``; the "sigma" argument of the denoiser is
    t), so sampling starts from pure noise at t = 1. ``shift`` warps t -> shift t / (1 + (shift - 1) t) (SD3,
    Sec. 5.3.2: more time at high noise for larger images), both for training draws and for the sampling grid.
    c_noise = t * ``num_timesteps`` (SD3 conditions its net on 1000 t).
    """

    space = "flow"
    # sampling grid (ldm.sampling.grids): the shifted times of diffusers' FlowMatchEulerDiscreteScheduler
    spacings = ("flow",)
    default_spacing = "flow"
    sigma_data = 1.0
    sigma_min = 0.0
    sigma_max = 1.0
    alpha_min = 0.0  # t = 1 is pure noise

    def __init__(self, shift: float = 1.0, num_timesteps: int = 1000) -> None:
        if shift <= 0.0:
            raise ValueError(f"shift must be > 0 (1 = no shift, SD3 uses 3), got {shift}.")
        self.shift = float(shift)
        self.num_timesteps = int(num_timesteps)

    def __repr__(self) -> str:
        return f"FlowSchedule(shift={self.shift}, num_timesteps={self.num_timesteps})"

    def shift_t(self, t: Tensor) -> Tensor:
        """t -> shift t / (1 + (shift - 1) t) (SD3, eq. 23); identity for shift = 1."""
        return shift_time(t, self.shift)

    def coefficients(self, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(a, alpha, s) = (1, 1 - t, t): x itself is the net input."""
        t = t.to(work_dtype(t.device))
        return torch.ones_like(t), 1.0 - t, t

    def c_noise(self, t: Tensor) -> Tensor:
        return (t.to(work_dtype(t.device)) * self.num_timesteps).to(float_dtype(t))

    def sigma_at_fraction(self, u: Tensor) -> Tensor:
        """u in [0, 1) -> shifted t, kept inside [1e-5, 1] so that eps- and x0-style targets stay finite."""
        return self.shift_t(u.to(work_dtype(u.device))).clamp(1e-5, 1.0)

    def init_noise_scale(self, sigma: float) -> float:
        """x_1 = eps: N(0, I) as is."""
        return 1.0
