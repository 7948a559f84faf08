"""Training noise-level distributions: which sigma each training sample is noised to (config group
``diffusion/timesteps``). Each returns sigma (B,) float64 in the schedule's own units (t for rectified flow):
    UniformTimesteps     u ~ U[0, 1)                        (DDPM: t ~ U{0..T-1})
    LogitNormalTimesteps u = sigmoid(m + s n), n ~ N(0,1)   (SD3, Esser et al. 2024, eq. 19)
    LogNormalSigmas      ln sigma ~ N(P_mean, P_std^2)      (EDM, Karras et al. 2022, Table 1),
                         clamped to the schedule
The loss weightings that go with them are in ``ldm.diffusion.weighting``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ldm.tensors import work_dtype


def _uniform(n: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
    return torch.rand(n, generator=generator, device=device, dtype=work_dtype(device))


class UniformTimesteps:
    """u ~ U[0, 1) mapped through the schedule (uniform integer t for discrete schedules)."""

    def __call__(self, schedule, n: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
        return schedule.sigma_at_fraction(_uniform(n, generator, device))

    def __repr__(self) -> str:
        return "UniformTimesteps()"


class LogitNormalTimesteps:
    """u = sigmoid(mean + std * n) mapped through the schedule (SD3's default: mean 0, std 1)."""

    def __init__(self, mean: float = 0.0, std: float = 1.0) -> None:
        if std <= 0:
            raise ValueError(f"std must be > 0, got {std}.")
        self.mean, self.std = float(mean), float(std)

    def __call__(self, schedule, n: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
        normal = torch.randn(n, generator=generator, device=device, dtype=work_dtype(device))
        u = torch.sigmoid(self.mean + self.std * normal)
        return schedule.sigma_at_fraction(u.clamp(max=1.0 - 1e-12))

    def __repr__(self) -> str:
        return f"LogitNormalTimesteps(mean={self.mean}, std={self.std})"


class LogNormalSigmas:
    """ln sigma ~ N(mean, std^2), clamped to [schedule.sigma_min, schedule.sigma_max] (EDM: -1.2, 1.2)."""

    def __init__(self, mean: float = -1.2, std: float = 1.2) -> None:
        if std <= 0:
            raise ValueError(f"std must be > 0, got {std}.")
        self.mean, self.std = float(mean), float(std)

    def __call__(self, schedule, n: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
        if schedule.space != "ve":
            raise ValueError("LogNormalSigmas draws VE sigmas; for rectified flow use LogitNormalTimesteps.")
        normal = torch.randn(n, generator=generator, device=device, dtype=work_dtype(device))
        return torch.exp(self.mean + self.std * normal).clamp(schedule.sigma_min, schedule.sigma_max)

    def __repr__(self) -> str:
        return f"LogNormalSigmas(mean={self.mean}, std={self.std})"
