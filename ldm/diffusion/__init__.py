"""Torch-only diffusion maths: noise schedules, the preconditioned denoiser and the training objective."""

from ldm.diffusion.denoiser import Denoiser
from ldm.diffusion.loss import DiffusionLoss
from ldm.diffusion.schedules import DiscreteSchedule

__all__ = ["DiffusionLoss", "Denoiser", "DiscreteSchedule"]
