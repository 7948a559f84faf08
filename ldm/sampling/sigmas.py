"""Sigma schedules for sampling on a discrete training grid.

The timestep selection mirrors diffusers' ``timestep_spacing`` (Lin et al. 2024, "Common Diffusion Noise
Schedules and Sample Steps are Flawed", Table 2): "leading" (+ steps_offset, Stable Diffusion uses 1),
"trailing" and "linspace". numpy is used on purpose so that float ``arange``/``round`` behave bit-for-bit like
the reference implementation.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ldm.diffusion.continuous import shift_time as flow_shift
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


def get_sigmas_karras(steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """(steps + 1,) float32 sigmas of Karras et al. 2022, eq. 5, followed by a final 0.

    sigma_i = (sigma_max^(1/rho) + i / (steps - 1) * (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho, i < steps:
    the first is sigma_max, the last nonzero one sigma_min. For a discrete schedule pass
    ``schedule.sigma_min`` and ``schedule.sigma_max`` (the full training range).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}.")
    if not 0.0 < sigma_min < sigma_max or rho <= 0.0:
        raise ValueError(f"need 0 < sigma_min < sigma_max and rho > 0, got {sigma_min=} {sigma_max=} {rho=}.")
    ramp = np.linspace(0.0, 1.0, steps)  # (steps,) i / (steps - 1); [0] for one step
    max_inv, min_inv = sigma_max ** (1.0 / rho), sigma_min ** (1.0 / rho)
    sigmas = (max_inv + ramp * (min_inv - max_inv)) ** rho  # (steps,) float64
    return torch.from_numpy(np.append(sigmas, 0.0)).to(torch.float32)  # (steps + 1,)


def get_sigmas_flow(steps: int, shift: float = 3.0, num_timesteps: int = 1000) -> Tensor:
    """(steps + 1,) float32 descending rectified-flow times t in (0, 1], followed by a final 0.

    The list diffusers' FlowMatchEulerDiscreteScheduler(shift=shift) builds: t runs linearly from 1 to the
    shifted smallest training time t_min = flow_shift(1 / num_timesteps), then is shifted (again) with
    ``flow_shift``; the net sees 1000 * t. shift = 1 gives linspace(1, 1 / num_timesteps, steps); SD3 uses
    shift = 3.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}.")
    if shift <= 0.0:
        raise ValueError(f"shift must be > 0 (1 = no shift, SD3 uses 3), got {shift}.")
    t_min = float(np.float32(flow_shift(1.0 / num_timesteps, shift)))  # diffusers keeps this table in float32
    ts = flow_shift(np.linspace(1.0, t_min, steps), shift)  # (steps,) float64
    return torch.from_numpy(np.append(ts, 0.0)).to(torch.float32)  # (steps + 1,)
