"""Loss weightings (config group ``diffusion/weighting``): small callables the loss takes from the config.

They return w (B,) multiplying the per-sample MSE in the prediction's own space; those defined on the x0 error
(min-SNR, EDM) are divided by the parameterisation's ``error_scale`` k:
    UniformWeighting   w = 1                            ("L_simple", Ho et al. 2020, eq. 14)
    MinSNRWeighting    w = min(SNR, gamma) / k          (Hang et al. 2023, eq. 9; eps: /SNR, v: /(SNR + 1))
    EDMWeighting       w = lambda(sigma) / k, lambda = (sigma^2 + sd^2) / (sigma sd)^2   (EDM, Table 1)
The training noise-level distributions are in ``ldm.diffusion.timesteps``.
"""

from __future__ import annotations

import torch
from torch import Tensor


def snr(alpha: Tensor, s: Tensor) -> Tensor:
    """Signal-to-noise ratio alpha^2 / s^2 of x_in = alpha x0 + s eps (Kingma et al. 2021)."""
    return (alpha / s) ** 2


class UniformWeighting:
    def __call__(self, alpha: Tensor, s: Tensor, k: Tensor, sigma_data: float) -> Tensor:
        return torch.ones_like(alpha)

    def __repr__(self) -> str:
        return "UniformWeighting()"


class MinSNRWeighting:
    """min(SNR, gamma) on the x0 error (Hang et al. 2023); gamma = 5 is the paper's recommendation."""

    def __init__(self, gamma: float = 5.0) -> None:
        if gamma <= 0:
            raise ValueError(f"gamma must be > 0 (the paper uses 5), got {gamma}.")
        self.gamma = float(gamma)

    def __call__(self, alpha: Tensor, s: Tensor, k: Tensor, sigma_data: float) -> Tensor:
        return snr(alpha, s).clamp(max=self.gamma) / k

    def __repr__(self) -> str:
        return f"MinSNRWeighting(gamma={self.gamma})"


class EDMWeighting:
    """lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 on the x0 error (EDM, Table 1)."""

    def __call__(self, alpha: Tensor, s: Tensor, k: Tensor, sigma_data: float) -> Tensor:
        sigma = s / alpha  # VE sigma of x_in = alpha (x0 + sigma eps)
        lam = (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2
        return lam / k

    def __repr__(self) -> str:
        return "EDMWeighting()"
