"""Backbones: plain nn.Modules with ``forward(x, c_noise, context, ...) -> Tensor``.

``BACKBONES`` maps a family to its class: ``configs/net/<family>_<size>.yaml`` builds it
(``tests/test_registries.py`` checks every config against this table, and DiT configs against ``DIT_SIZES``).
"""

from torch import nn

from ldm.nets.dit import DIT_SIZES, DiT, build_dit
from ldm.nets.unet import UNet

BACKBONES: dict[str, type[nn.Module]] = {"unet": UNet, "dit": DiT}

__all__ = ["BACKBONES", "DIT_SIZES", "DiT", "UNet", "build_dit"]
