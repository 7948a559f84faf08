"""Backbones: plain nn.Modules with ``forward(x, c_noise, context, ...) -> Tensor``."""

from ldm.nets.dit import DIT_SIZES, DiT, build_dit
from ldm.nets.unet import UNet

__all__ = ["DIT_SIZES", "DiT", "UNet", "build_dit"]
