"""Samplers (pure functions over a denoiser callable), sigma schedules and guidance wrappers."""

from ldm.sampling.guidance import CFGDenoiser
from ldm.sampling.multistep import sample_dpmpp_2m, sample_dpmpp_2m_sde, sample_plms, sample_unipc
from ldm.sampling.samplers import sample_ddim, sample_ddpm
from ldm.sampling.sigmas import (
    get_sigmas_discrete,
    get_sigmas_flow,
    get_sigmas_karras,
    get_timesteps_discrete,
)
from ldm.sampling.solvers import sample_euler, sample_euler_ancestral, sample_flow_euler, sample_heun

__all__ = [
    "CFGDenoiser",
    "get_sigmas_discrete",
    "get_sigmas_flow",
    "get_sigmas_karras",
    "get_timesteps_discrete",
    "sample_ddim",
    "sample_ddpm",
    "sample_dpmpp_2m",
    "sample_dpmpp_2m_sde",
    "sample_euler",
    "sample_euler_ancestral",
    "sample_flow_euler",
    "sample_heun",
    "sample_plms",
    "sample_unipc",
]
