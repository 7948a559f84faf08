"""The sampling grid for a trained model's schedule (which samplers fit it: ``ldm.sampling.registry``).

Each schedule names the grids it can be sampled on (``schedule.spacings``) and its own default
(``schedule.default_spacing``); this module builds them:
    leading | trailing | linspace
        training timesteps picked as diffusers' timestep_spacing (discrete VP schedules)
    karras
        Karras et al. 2022's rho schedule between the schedule's sigma_min and sigma_max
    flow
        the shifted rectified-flow times of diffusers' FlowMatchEulerDiscreteScheduler
The defaults are trailing (VP), karras (EDM) and flow: trailing starts at the last training timestep (Lin et
al. 2024) and measured closest to a 1,000-step solve for our multistep samplers (bench/sampler_chooser.py).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from ldm.sampling.sigmas import SPACINGS, get_sigmas_discrete, get_sigmas_flow, get_sigmas_karras


def _discrete(schedule, steps: int, spacing: str, steps_offset: int, rho: float) -> Tensor:
    return get_sigmas_discrete(schedule, steps, spacing, steps_offset)


def _karras(schedule, steps: int, spacing: str, steps_offset: int, rho: float) -> Tensor:
    return get_sigmas_karras(steps, schedule.sigma_min, schedule.sigma_max, rho)


def _flow(schedule, steps: int, spacing: str, steps_offset: int, rho: float) -> Tensor:
    return get_sigmas_flow(steps, schedule.shift, schedule.num_timesteps)


GRIDS: dict[str, Callable[..., Tensor]] = {
    **dict.fromkeys(SPACINGS, _discrete),
    "karras": _karras,
    "flow": _flow,
}


def sampling_sigmas(
    schedule, steps: int, spacing: str | None = None, steps_offset: int = 1, rho: float = 7.0
) -> Tensor:
    """(steps + 1,) descending noise levels ending in 0, in the schedule's own units (t for rectified
    flow)."""
    spacing = spacing or schedule.default_spacing
    if spacing not in schedule.spacings:
        raise ValueError(
            f"spacing must be one of {schedule.spacings} (or null) for {schedule!r}, got {spacing!r}; "
            f"e.g. spacing={schedule.default_spacing}."
        )
    return GRIDS[spacing](schedule, steps, spacing, steps_offset, rho)
