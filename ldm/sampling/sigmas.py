"""Sigma schedules for sampling on a discrete training grid.

The timestep selection mirrors diffusers' ``timestep_spacing`` (Lin et al. 2024, "Common Diffusion Noise
Schedules and Sample Steps are Flawed", Table 2): "leading" (+ steps_offset, Stable Diffusion uses 1),
"trailing" and "linspace". numpy is used on purpose so that float ``arange``/``round`` behave bit-for-bit like
the reference implementation.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from ldm.diffusion.schedules import DiscreteSchedule

SPACINGS = ("leading", "trailing", "linspace")


def get_timesteps_discrete(
    num_timesteps: int, steps: int, spacing: str = "leading", steps_offset: int = 1
) -> Tensor:
    """(steps,) descending int64 training timesteps picked from 0..num_timesteps-1."""
    if spacing not in SPACINGS:
        raise ValueError(f"spacing must be one of {SPACINGS}, got {spacing!r}.")
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps must be in [1, {num_timesteps}] (the training timesteps), got {steps}.")
    if spacing == "linspace":
        ts = np.linspace(0, num_timesteps - 1, steps).round()[::-1].astype(np.int64)
    elif spacing == "leading":
        ratio = num_timesteps // steps
        ts = (np.arange(0, steps) * ratio).round()[::-1].astype(np.int64) + steps_offset
    else:
        ratio = num_timesteps / steps
        ts = np.round(np.arange(num_timesteps, 0, -ratio)).astype(np.int64) - 1
    if len(ts) != steps or ts.min() < 0 or ts.max() >= num_timesteps:
        raise ValueError(
            f"{spacing!r} spacing with {steps} steps and steps_offset={steps_offset} gives timesteps outside "
            f"0..{num_timesteps - 1}; lower steps_offset or use another spacing."
        )
    return torch.from_numpy(ts.copy())


def get_sigmas_discrete(
    schedule: DiscreteSchedule, steps: int, spacing: str = "leading", steps_offset: int = 1
) -> Tensor:
    """(steps + 1,) descending float32 sigmas at the selected training timesteps, followed by a final 0."""
    ts = get_timesteps_discrete(schedule.num_timesteps, steps, spacing, steps_offset)  # (steps,)
    sigmas = schedule.sigmas[ts]  # (steps,) float64
    return torch.cat([sigmas, sigmas.new_zeros(1)]).to(torch.float32)  # (steps + 1,)


def init_noise_scale(sigma_max: float) -> float:
    """sqrt(1 + sigma_max^2): scales N(0, I) (the VP prior x_T) into VE coordinates x = x_T / sqrt(abar_T)."""
    return math.sqrt(1.0 + float(sigma_max) ** 2)
