"""The original single-file LDM / Stable Diffusion UNet layout: ``model.diffusion_model.*`` tensors in a
``.ckpt`` (``{"state_dict": ...}``, read with ``torch.load(weights_only=True)``) or ``.safetensors`` file,
and the ``model.params.unet_config.params`` of its YAML
(``ldm.modules.diffusionmodules.openaimodel.UNetModel``).

Our UNet keeps that block order, so the weights are renames only (``ldm.convert.unet_keys``, layout "ldm").
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ldm.convert.unet_keys import convert_state_dict, meta_unet
from ldm.nets.unet import UNet

LDM_UNET_PREFIX = "model.diffusion_model."

# openaimodel.UNetModel arguments our UNet represents only at one value (its default).
_LDM_FIXED: dict[str, Any] = {
    "use_spatial_transformer": True,
    "conv_resample": True,
    "dims": 2,
    "num_classes": None,
    "use_scale_shift_norm": False,
    "resblock_updown": False,
    "num_heads_upsample": -1,
    "n_embed": None,
    "disable_self_attentions": None,
    "num_attention_blocks": None,
    "disable_middle_self_attn": False,
    "adm_in_channels": None,
}
# Arguments that change nothing our UNet computes (memory, precision and image-size switches; old head rule).
_LDM_IGNORED = ("image_size", "use_checkpoint", "use_fp16", "legacy", "use_new_attention_order")
_LDM_REQUIRED = ("in_channels", "out_channels", "model_channels", "num_res_blocks", "attention_resolutions")


def _one(name: str, value: Any) -> Any:
    """An int or a list of equal ints (``transformer_depth``, ``context_dim``) -> that int."""
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ValueError(
                f"LDM unet_config field {name}={value!r} is not supported: our UNet uses one value"
            )
        return value[0]
    return value


def ldm_unet_params_to_kwargs(params: Mapping[str, Any]) -> dict[str, Any]:
    """``unet_config.params`` of an original LDM/SD YAML -> keyword arguments of our UNet.

    ``attention_resolutions`` has the same meaning in both (downsampling factors). ``num_head_channels``
    (SD 2.x: 64) wins over ``num_heads`` (SD 1.x: 8) as in openaimodel; ``use_linear_in_transformer`` ->
    ``use_linear_projection``. Refuses (one-line ValueError naming the field) what our UNet lacks.
    """
    params = dict(params)
    for name in _LDM_REQUIRED:
        if name not in params:
            raise ValueError(
                f"LDM unet_config has no {name}; pass model.params.unet_config.params of the YAML"
            )
    for name, value in params.items():
        if (
            name in _LDM_FIXED
            and value != _LDM_FIXED[name]
            and not (name == "num_heads_upsample" and value is None)
        ):
            raise ValueError(
                f"LDM unet_config field {name}={value!r} is not supported (only {_LDM_FIXED[name]!r})"
            )
    if params.get("use_spatial_transformer", False) is not True:
        raise ValueError("LDM unet_config field use_spatial_transformer=False is not supported (only True)")
    heads, head_channels = params.get("num_heads", -1), params.get("num_head_channels", -1)
    if head_channels in (-1, None) and heads in (-1, None):
        raise ValueError("LDM unet_config sets neither num_heads nor num_head_channels")
    return {
        "in_channels": params["in_channels"],
        "out_channels": params["out_channels"],
        "model_channels": params["model_channels"],
        "channel_mult": list(params.get("channel_mult", (1, 2, 4, 8))),
        "num_res_blocks": _one("num_res_blocks", params["num_res_blocks"]),
        "attention_resolutions": list(params["attention_resolutions"]),
        "num_heads": heads if heads not in (-1, None) else 1,
        "num_head_channels": None if head_channels in (-1, None) else head_channels,
        "context_dim": _one("context_dim", params.get("context_dim")),
        "dropout": float(params.get("dropout", 0.0)),
        "transformer_depth": _one("transformer_depth", params.get("transformer_depth", 1)),
        "use_linear_projection": bool(params.get("use_linear_in_transformer", False)),
    }


def read_ldm_unet_state_dict(path: str | Path) -> dict[str, Tensor]:
    """The UNet tensors of a single-file LDM/SD checkpoint, keys without ``model.diffusion_model.``.

    ``.safetensors`` is read with safetensors; anything else with ``torch.load(weights_only=True)`` (a
    ``{"state_dict": ...}`` Lightning/LDM checkpoint or a bare state dict). EMA copies (``model_ema.*``)
    are not read: LDM checkpoints store the EMA weights there under mangled names.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"no checkpoint at {path}; pass a .ckpt or .safetensors single-file checkpoint"
        )
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
    unet = {k[len(LDM_UNET_PREFIX) :]: v for k, v in state.items() if k.startswith(LDM_UNET_PREFIX)}
    if not unet:
        raise ValueError(
            f"{path} has no '{LDM_UNET_PREFIX}*' tensors; it is not a single-file LDM/SD checkpoint"
        )
    return unet


def unet_from_ldm_checkpoint(path: str | Path, unet_kwargs: Mapping[str, Any]) -> UNet:
    """Our UNet (float32) with the weights of a single-file LDM/SD checkpoint; ``unet_kwargs`` from
    ``ldm_unet_params_to_kwargs`` (the YAML) or ``diffusers_config_to_unet_kwargs``."""
    net = UNet(**unet_kwargs)
    state = convert_state_dict(read_ldm_unet_state_dict(path), meta_unet(unet_kwargs), "ldm", "ours")
    net.load_state_dict(state, strict=True)
    return net


def unet_to_ldm_state_dict(unet: UNet) -> dict[str, Tensor]:
    """Our UNet's tensors under their single-file names (``model.diffusion_model.*``), same tensors."""
    state = convert_state_dict(unet.state_dict(), unet, "ours", "ldm")
    return {LDM_UNET_PREFIX + k: v for k, v in state.items()}
