"""Backbones: plain nn.Modules with ``forward(x, c_noise, context, ...) -> Tensor``."""

from ldm.nets.unet import UNet

__all__ = ["UNet"]
