"""The sampling grid for a trained model's schedule, and the check that a sampler fits the schedule's coordinates.

    DiscreteSchedule (VP)   spacing leading | trailing | linspace (diffusers' timestep_spacing) or karras
    EDMSchedule             karras (EDM's rho schedule between sigma_min and sigma_max)
    FlowSchedule            the shifted rectified-flow times of diffusers' FlowMatchEulerDiscreteScheduler
``spacing=None`` picks each schedule's own default (trailing, karras, flow): trailing starts at the last training
timestep (Lin et al. 2024) and measured closest to a 1,000-step solve for our multistep samplers (bench/sampler_chooser.py).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from torch import Tensor

from ldm.diffusion.continuous import EDMSchedule, FlowSchedule
from ldm.diffusion.schedules import DiscreteSchedule
from ldm.sampling.sigmas import SPACINGS, get_sigmas_discrete, get_sigmas_flow, get_sigmas_karras
from ldm.sampling.solvers import sample_flow_euler

FLOW_SAMPLERS = (sample_flow_euler,)  # samplers whose state is x_t = (1 - t) x0 + t eps
DEFAULT_SPACING = {DiscreteSchedule: "trailing", EDMSchedule: "karras", FlowSchedule: "flow"}


def sampling_sigmas(
    schedule, steps: int, spacing: str | None = None, steps_offset: int = 1, rho: float = 7.0
) -> Tensor:
    """(steps + 1,) descending noise levels ending in 0, in the schedule's own units (t for rectified flow)."""
    spacing = spacing or DEFAULT_SPACING.get(type(schedule))
    if isinstance(schedule, DiscreteSchedule):
        if spacing == "karras":
            return get_sigmas_karras(steps, schedule.sigma_min, schedule.sigma_max, rho)
        if spacing not in SPACINGS:
            raise ValueError(
                f"spacing must be one of {(*SPACINGS, 'karras')} for a discrete schedule, got {spacing!r}."
            )
        return get_sigmas_discrete(schedule, steps, spacing, steps_offset)
    if isinstance(schedule, EDMSchedule):
        if spacing != "karras":
            raise ValueError(f"an EDM schedule samples on spacing=karras (or null), got {spacing!r}.")
        return get_sigmas_karras(steps, schedule.sigma_min, schedule.sigma_max, rho)
    if isinstance(schedule, FlowSchedule):
        if spacing != "flow":
            raise ValueError(f"a rectified-flow schedule samples on spacing=flow (or null), got {spacing!r}.")
        return get_sigmas_flow(steps, schedule.shift, schedule.num_timesteps)
    raise TypeError(
        f"no sampling grid for schedule {schedule!r}; use DiscreteSchedule, EDMSchedule or FlowSchedule."
    )


def sampler_name(sampler: Callable) -> str:
    func = sampler.func if isinstance(sampler, functools.partial) else sampler
    return getattr(func, "__name__", repr(func))


def check_sampler(sampler: Callable, schedule) -> None:
    """Refuse a VE sampler on a rectified-flow model and the flow sampler on a VE model."""
    func = sampler.func if isinstance(sampler, functools.partial) else sampler
    is_flow = func in FLOW_SAMPLERS
    if schedule.space == "flow" and not is_flow:
        raise ValueError(
            f"{sampler_name(sampler)} works on x = x0 + sigma eps but this model is a rectified flow: "
            "use sampler=flow_euler"
        )
    if schedule.space != "flow" and is_flow:
        raise ValueError(
            f"{sampler_name(sampler)} is for rectified-flow models; this model's schedule is {schedule!r}: "
            "use e.g. sampler=dpmpp_2m or sampler=ddim"
        )
