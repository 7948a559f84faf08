"""Torch-only diffusion maths: noise schedules, parameterisations, the preconditioned denoiser and the
objective."""

from ldm.diffusion.continuous import EDMSchedule, FlowSchedule
from ldm.diffusion.denoiser import Denoiser
from ldm.diffusion.loss import DiffusionLoss
from ldm.diffusion.schedules import DiscreteSchedule
from ldm.diffusion.timesteps import LogitNormalTimesteps, LogNormalSigmas, UniformTimesteps
from ldm.diffusion.weighting import EDMWeighting, MinSNRWeighting, UniformWeighting

__all__ = [
    "Denoiser",
    "DiffusionLoss",
    "DiscreteSchedule",
    "EDMSchedule",
    "EDMWeighting",
    "FlowSchedule",
    "LogNormalSigmas",
    "LogitNormalTimesteps",
    "MinSNRWeighting",
    "UniformTimesteps",
    "UniformWeighting",
]
