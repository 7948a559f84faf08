"""The sampler registry: every sampler by name, with the coordinates it integrates in and what tests expect of
it.

One table read by everything that lists samplers: ``check_sampler`` (refuses a sampler on a model whose
coordinates it does not work in), ``configs/sampler/<name>.yaml`` (``tests/test_registries.py`` checks that
each entry has one and each config names a registered function), ``bench/sampler_chooser.py`` and the
convergence and diffusers-parity tests. Adding a sampler: write
``sample_<name>(denoiser, x, sigmas, *, extra_args, callback, generator)``, add one entry here and one
``configs/sampler/<name>.yaml``.

Coordinates (``space``, the schedule's ``space`` attribute):
    "ve"    x = x0 + sigma eps: discrete VP schedules in their sigma view and EDM (Karras et al. 2022, eq. 4)
    "flow"  x = (1 - t) x0 + t eps: rectified flow, the "sigma" argument is t (Esser et al. 2024)
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from ldm.sampling.multistep import sample_dpmpp_2m, sample_dpmpp_2m_sde, sample_plms, sample_unipc
from ldm.sampling.samplers import sample_ddim, sample_ddpm
from ldm.sampling.solvers import sample_euler, sample_euler_ancestral, sample_flow_euler, sample_heun

SPACES = ("ve", "flow")
_MODELS = {"ve": "VP/VE-sigma models (x = x0 + sigma eps)", "flow": "rectified-flow models"}
_MODEL = {"ve": "a VP/VE-sigma model", "flow": "a rectified flow"}


@dataclass(frozen=True)
class SamplerSpec:
    """One sampler: its function, the coordinates it works in and its convergence order with default options.

    ``order``: global order of the ODE solution for deterministic samplers; for stochastic ones 1 when the
    error of the sample variance shrinks at first order, 2 when it is already within Monte Carlo noise at 128
    steps (``tests/test_sampler_convergence.py``). ``reference``: the diffusers scheduler its parity test
    compares with.
    """

    fn: Callable[..., Tensor]
    space: str
    stochastic: bool
    order: int
    reference: str

    def __post_init__(self) -> None:
        if self.space not in SPACES:
            raise ValueError(f"space must be one of {SPACES}, got {self.space!r}.")


SAMPLERS: dict[str, SamplerSpec] = {
    "ddim": SamplerSpec(sample_ddim, "ve", False, 1, "DDIMScheduler"),
    "ddpm": SamplerSpec(sample_ddpm, "ve", True, 1, "DDPMScheduler"),
    "euler": SamplerSpec(sample_euler, "ve", False, 1, "EulerDiscreteScheduler"),
    "euler_ancestral": SamplerSpec(sample_euler_ancestral, "ve", True, 1, "EulerAncestralDiscreteScheduler"),
    "heun": SamplerSpec(sample_heun, "ve", False, 2, "HeunDiscreteScheduler"),
    "plms": SamplerSpec(sample_plms, "ve", False, 2, "PNDMScheduler"),
    "dpmpp_2m": SamplerSpec(sample_dpmpp_2m, "ve", False, 2, "DPMSolverMultistepScheduler"),
    "dpmpp_2m_sde": SamplerSpec(sample_dpmpp_2m_sde, "ve", True, 2, "DPMSolverMultistepScheduler"),
    "unipc": SamplerSpec(sample_unipc, "ve", False, 3, "UniPCMultistepScheduler"),
    "flow_euler": SamplerSpec(sample_flow_euler, "flow", False, 1, "FlowMatchEulerDiscreteScheduler"),
}


def samplers_for(space: str) -> dict[str, SamplerSpec]:
    """The registered samplers that work in ``space`` ("ve" or "flow"), by name."""
    return {name: spec for name, spec in SAMPLERS.items() if spec.space == space}


def _function(sampler: Callable) -> Callable:
    return sampler.func if isinstance(sampler, functools.partial) else sampler


def sampler_name(sampler: Callable) -> str:
    """The registry name of a sampler function or ``functools.partial`` of one, else the function's own
    name."""
    func = _function(sampler)
    for name, spec in SAMPLERS.items():
        if spec.fn is func:
            return name
    return getattr(func, "__name__", repr(func))


def sampler_spec(sampler: Callable) -> SamplerSpec:
    """The registry entry of a sampler function (or partial); a clear error for an unregistered one."""
    name = sampler_name(sampler)
    if name not in SAMPLERS:
        raise ValueError(
            f"sampler {name} is not registered: add it to SAMPLERS in ldm/sampling/registry.py "
            f"(registered: {', '.join(SAMPLERS)})"
        )
    return SAMPLERS[name]


def check_sampler(sampler: Callable, schedule) -> None:
    """Refuse a sampler whose coordinates (``SamplerSpec.space``) are not the schedule's
    (``schedule.space``)."""
    spec = sampler_spec(sampler)
    if spec.space != schedule.space:
        fits = " or ".join(f"sampler={n}" for n in samplers_for(schedule.space))
        raise ValueError(
            f"{sampler_name(sampler)} is for {_MODELS[spec.space]} but this model ({schedule!r}) is "
            f"{_MODEL[schedule.space]}: use {fits}"
        )
