"""Converters between our networks and other formats (diffusers, original LDM / Stable Diffusion files):
plain functions over configs and state dicts; diffusers is imported only where a diffusers model is built."""

from ldm.convert.diffusers_unet import (
    ConversionReport,
    diffusers_config_to_unet_kwargs,
    unet_from_diffusers,
    unet_to_diffusers,
    unet_to_diffusers_config,
)
from ldm.convert.unet_keys import convert_state_dict, key_map

__all__ = [
    "ConversionReport",
    "convert_state_dict",
    "diffusers_config_to_unet_kwargs",
    "key_map",
    "unet_from_diffusers",
    "unet_to_diffusers",
    "unet_to_diffusers_config",
]
