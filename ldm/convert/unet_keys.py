"""State-dict key maps between our UNet (``ldm.nets.unet.UNet``) and two other layouts of the same
network: diffusers' ``UNet2DConditionModel`` (``"diffusers"``) and the original single-file LDM / Stable
Diffusion checkpoints (``"ldm"``, the ``model.diffusion_model.*`` keys without that prefix).

Our UNet keeps the original LDM block order (``input_blocks`` / ``middle_block`` / ``output_blocks``), so
the maps are one-to-one renames, built from the modules of a UNet of the right configuration (a meta-device
copy when only its keyword arguments are known). Tensors are never changed, except that a 1x1-conv
projection weight (C, C, 1, 1) is reshaped to a Linear weight (C, C) or back where the target wants it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ldm.nets.layers import Downsample, ResBlock, SpatialTransformer, Upsample
from ldm.nets.unet import UNet

LAYOUTS = ("ours", "diffusers", "ldm")

# ResBlock parameter names: ours -> diffusers ResnetBlock2D / original LDM ResBlock.
_RES = {
    "diffusers": {
        "norm1": "norm1",
        "conv1": "conv1",
        "emb_proj": "time_emb_proj",
        "norm2": "norm2",
        "conv2": "conv2",
        "skip": "conv_shortcut",
    },
    "ldm": {
        "norm1": "in_layers.0",
        "conv1": "in_layers.2",
        "emb_proj": "emb_layers.1",
        "norm2": "out_layers.0",
        "conv2": "out_layers.3",
        "skip": "skip_connection",
    },
}
_DOWN_CONV = {"diffusers": "conv", "ldm": "op"}
# Top-level modules outside the block lists (ours -> diffusers; the LDM names equal ours).
_TOP = {
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "input_blocks.0.0": "conv_in",
    "out.0": "conv_norm_out",
    "out.2": "conv_out",
}


def _split(key: str, prefix: str) -> str:
    return key[len(prefix) + 1 :]


def _transformer_suffix(rest: str) -> str:
    """Suffix inside a SpatialTransformer, ours -> diffusers/LDM (they agree there)."""
    if rest.startswith("block."):
        rest = "transformer_blocks.0." + rest[len("block.") :]
    elif rest.startswith("extra_blocks."):
        index, tail = rest[len("extra_blocks.") :].split(".", 1)
        rest = f"transformer_blocks.{int(index) + 1}.{tail}"
    return rest.replace(".ff.proj_in.", ".ff.net.0.proj.").replace(".ff.proj_out.", ".ff.net.2.")


def _module_suffix(module: nn.Module, rest: str, layout: str) -> str:
    """Rename ``rest`` (a parameter path inside one block module) for ``layout``."""
    if isinstance(module, ResBlock):
        name, tail = rest.split(".", 1)
        return f"{_RES[layout][name]}.{tail}"
    if isinstance(module, SpatialTransformer):
        return _transformer_suffix(rest)
    if isinstance(module, Downsample):
        return rest.replace("conv.", _DOWN_CONV[layout] + ".", 1)
    if isinstance(module, Upsample):
        return rest
    raise ValueError(f"no key mapping for module type {type(module).__name__}")


def _diffusers_prefix(unet: UNet, group: str, n: int, module: nn.Module) -> str:
    """The diffusers module path of ``{group}.{n}.{m}`` (group: input_blocks / middle_block /
    output_blocks)."""
    per_level = unet.num_res_blocks + 1
    kind = "resnets" if isinstance(module, ResBlock) else "attentions"
    if group == "middle_block":
        return {0: "mid_block.resnets.0", 1: "mid_block.attentions.0", 2: "mid_block.resnets.1"}[n]
    if group == "input_blocks":  # n >= 1; block 0 is conv_in
        level, j = divmod(n - 1, per_level)
        if isinstance(module, Downsample):
            return f"down_blocks.{level}.downsamplers.0"
        return f"down_blocks.{level}.{kind}.{j}"
    k, j = divmod(n, per_level)  # up block k serves level len(channel_mult) - 1 - k
    if isinstance(module, Upsample):
        return f"up_blocks.{k}.upsamplers.0"
    return f"up_blocks.{k}.{kind}.{j}"


def _map_key(unet: UNet, key: str, layout: str) -> str:
    for ours, theirs in _TOP.items():
        if key.startswith(ours + "."):
            return (theirs if layout == "diffusers" else ours) + "." + _split(key, ours)
    parts = key.split(".")
    if parts[0] == "middle_block":
        group, n = parts[0], int(parts[1])
        prefix = f"middle_block.{n}"
        module = unet.middle_block[n]
    else:
        group, n = parts[0], int(parts[1])
        prefix = f"{group}.{n}.{parts[2]}"
        module = getattr(unet, group)[n][int(parts[2])]
    rest = _module_suffix(module, _split(key, prefix), layout)
    if layout == "ldm":
        return f"{prefix}.{rest}"
    return f"{_diffusers_prefix(unet, group, n, module)}.{rest}"


def key_map(unet: UNet, layout: str) -> dict[str, str]:
    """Our state-dict key -> the ``layout`` key ("ours", "diffusers" or "ldm"), for every tensor of
    ``unet``."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown state-dict layout {layout!r}; choose one of {LAYOUTS}")
    keys = list(unet.state_dict())
    if layout == "ours":
        return {k: k for k in keys}
    mapping = {k: _map_key(unet, k, layout) for k in keys}
    if len(set(mapping.values())) != len(mapping):
        raise RuntimeError(f"key map to {layout!r} is not one-to-one (a converter bug)")
    return mapping


def meta_unet(unet_kwargs: Mapping[str, Any]) -> UNet:
    """A UNet with these keyword arguments on the meta device (no memory, no init cost): its keys and
    shapes."""
    with torch.device("meta"):
        return UNet(**unet_kwargs)


def _fit_shape(key: str, value: Tensor, shape: torch.Size) -> Tensor:
    """Reshape a 1x1-conv projection (C, C, 1, 1) <-> Linear (C, C) weight; refuse any other mismatch."""
    if value.shape == shape:
        return value
    if value.numel() == shape.numel() and key.endswith(("proj_in.weight", "proj_out.weight")):
        return value.reshape(shape)
    raise ValueError(
        f"tensor {key} has shape {tuple(value.shape)} but the UNet config wants {tuple(shape)}; "
        "the checkpoint and the config describe different networks"
    )


def convert_state_dict(
    state_dict: Mapping[str, Tensor],
    unet: UNet | Mapping[str, Any],
    source: str,
    target: str,
) -> dict[str, Tensor]:
    """Rename every tensor of ``state_dict`` from layout ``source`` to layout ``target``.

    ``unet`` is our UNet or its keyword arguments (the key maps depend on its configuration). Keys must
    match exactly: missing or unexpected ones raise a one-line ValueError. Values are the same tensors
    (no copy), except 1x1-conv/Linear projection weights reshaped to the shape the target expects.
    """
    net = unet if isinstance(unet, UNet) else meta_unet(unet)
    to_source, to_target = key_map(net, source), key_map(net, target)
    from_source = {v: k for k, v in to_source.items()}
    missing = sorted(set(from_source) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(from_source))
    if missing or unexpected:
        raise ValueError(
            f"{source} state dict does not fit the UNet config: {len(missing)} missing keys "
            f"(first: {missing[:3]}), {len(unexpected)} unexpected keys (first: {unexpected[:3]})"
        )
    shapes = {k: v.shape for k, v in net.state_dict().items()}
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        ours = from_source[key]
        out[to_target[ours]] = _fit_shape(key, value, shapes[ours])
    return out
