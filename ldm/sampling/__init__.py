"""Samplers (pure functions over a denoiser callable), sigma schedules and guidance wrappers."""

from ldm.sampling.guidance import CFGDenoiser
from ldm.sampling.samplers import sample_ddim, sample_ddpm
from ldm.sampling.sigmas import get_sigmas_discrete, get_timesteps_discrete, init_noise_scale

__all__ = [
    "CFGDenoiser",
    "get_sigmas_discrete",
    "get_timesteps_discrete",
    "init_noise_scale",
    "sample_ddim",
    "sample_ddpm",
]
