"""Convert between diffusers' ``UNet2DConditionModel`` and our UNet (``ldm.nets.unet.UNet``): configs both
ways, weights both ways (through ``ldm.convert.unet_keys``), and whole models.

Calling convention (how the outputs match): our net is called by ``ldm.diffusion.denoiser.Denoiser`` as
``net(x_in, c_noise, context=..., context_mask=...)``. For the discrete VP (DDPM) schedules ``x_in`` is
exactly the DDPM ``x_t`` and ``c_noise`` the (possibly fractional) training timestep ``t``, so

    ours(x_t, t, context, context_mask) == unet(x_t, t, encoder_hidden_states=context,
                                                encoder_attention_mask=context_mask).sample

with ``context_mask`` (B, L) True/1 = real token (diffusers turns 0 into a -10000 bias; we drop the key;
both give zero weight in float32). The prediction type (eps for SD 1.x and SD 2.x-base, v for SD 2.x-768)
is the objective's business, not the net's.

Only diffusers is imported lazily (inside the model-level functions); the config mappings are plain dicts.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ldm.convert.unet_keys import convert_state_dict
from ldm.nets.unet import UNet

log = logging.getLogger(__name__)

_CROSS_DOWN, _PLAIN_DOWN = "CrossAttnDownBlock2D", "DownBlock2D"
_UP_OF = {_CROSS_DOWN: "CrossAttnUpBlock2D", _PLAIN_DOWN: "UpBlock2D"}

# Fields our UNet represents only at one value (diffusers' default): anything else is refused.
_FIXED: dict[str, Any] = {
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "reverse_transformer_layers_per_block": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "num_attention_heads": None,
    "dual_cross_attention": False,
    "class_embed_type": None,
    "addition_embed_type": None,
    "addition_time_embed_dim": None,
    "num_class_embeds": None,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "projection_class_embeddings_input_dim": None,
    "attention_type": "default",
    "class_embeddings_concat": False,
    "cross_attention_norm": None,
}
# Diffusers' defaults (v0.42) for the fields we map, used when an older config.json lacks one.
_DEFAULTS: dict[str, Any] = {
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": (_CROSS_DOWN, _CROSS_DOWN, _CROSS_DOWN, _PLAIN_DOWN),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "only_cross_attention": False,
    "mid_block_only_cross_attention": None,
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "dropout": 0.0,
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 1280,
    "transformer_layers_per_block": 1,
    "attention_head_dim": 8,
    "use_linear_projection": False,
    "upcast_attention": False,
}
# Fields that do not change the network's function (sample_size only sets pipelines' default size).
_IGNORED = ("sample_size", "addition_embed_type_num_heads")


@dataclass
class ConversionReport:
    """What a conversion did: the UNet kwargs, the tensors moved, and the diffusers fields left unused."""

    unet_kwargs: dict[str, Any]
    num_tensors: int = 0
    source_dtype: str = "float32"
    ignored_fields: dict[str, Any] = field(default_factory=dict)


def _refuse(name: str, value: Any, why: str) -> ValueError:
    return ValueError(
        f"diffusers UNet config field {name}={value!r} is not supported by ldm.nets.unet.UNet: {why}"
    )


def _uniform(name: str, value: Any, indices: Sequence[int], n: int) -> Any:
    """An int/scalar or a per-block list whose entries at ``indices`` agree -> that one value."""
    if not isinstance(value, (list, tuple)):
        return value
    if len(value) != n:
        raise _refuse(name, value, f"expected one entry per block ({n})")
    picked = {value[i] if not isinstance(value[i], list) else tuple(value[i]) for i in indices}
    if len(picked) > 1 or any(isinstance(v, tuple) for v in picked):
        raise _refuse(name, value, "our UNet uses one value for all blocks")
    return value[indices[0]] if indices else value[0]


def _heads(config: Mapping[str, Any], widths: Sequence[int], attn_levels: Sequence[int]) -> dict[str, Any]:
    """diffusers ``attention_head_dim`` (used as heads per block, issue diffusers#2011) -> num_heads or
    num_head_channels. The mid block uses the last entry at the last width."""
    value = config["attention_head_dim"]
    heads = list(value) if isinstance(value, (list, tuple)) else [value] * len(widths)
    if len(heads) != len(widths) or any(h is None or h < 1 for h in heads):
        raise _refuse("attention_head_dim", value, "expected a positive int or one per block")
    used = [*attn_levels, len(widths) - 1]
    if len({heads[i] for i in used}) == 1:
        return {"num_heads": heads[used[0]], "num_head_channels": None}
    dims = {widths[i] / heads[i] for i in used}
    if len(dims) == 1 and float(next(iter(dims))).is_integer():
        return {"num_heads": heads[used[0]], "num_head_channels": int(next(iter(dims)))}
    raise _refuse("attention_head_dim", value, "heads must be the same or have the same width at every level")


def diffusers_config_to_unet_kwargs(config: Mapping[str, Any]) -> dict[str, Any]:
    """A diffusers ``UNet2DConditionModel`` config (its ``config.json`` dict) -> keyword arguments of our
    UNet.

    Mapping: block_out_channels -> model_channels (first) and channel_mult (ratios); layers_per_block ->
    num_res_blocks; the levels whose down block is CrossAttnDownBlock2D -> attention_resolutions (2**level);
    attention_head_dim -> num_heads or num_head_channels; cross_attention_dim -> context_dim;
    transformer_layers_per_block -> transformer_depth; norm_num_groups -> norm_groups; the rest keep their
    names. Anything our UNet cannot represent raises a one-line ValueError naming the field and value.
    ``dropout``: diffusers drops out in the ResBlocks only, ours also in attention and feed-forward
    (identical at eval; fine-tuning with dropout > 0 differs slightly).
    """
    cfg = {**_DEFAULTS, **{k: v for k, v in config.items() if not k.startswith("_")}}
    for name, value in cfg.items():
        if name in _FIXED:
            if value != _FIXED[name]:
                raise _refuse(name, value, f"only {_FIXED[name]!r} is representable")
        elif name not in _DEFAULTS and name not in _IGNORED and value is not None:
            raise _refuse(name, value, "unknown field (newer diffusers?); convert by hand if it is harmless")
    widths = list(cfg["block_out_channels"])
    c0 = widths[0]
    if any(w % c0 for w in widths):
        raise _refuse("block_out_channels", widths, "every width must be a multiple of the first")
    down = list(cfg["down_block_types"])
    if len(down) != len(widths) or any(t not in _UP_OF for t in down):
        raise _refuse(
            "down_block_types", down, f"expected one of {sorted(_UP_OF)} per block_out_channels entry"
        )
    if list(cfg["up_block_types"]) != [_UP_OF[t] for t in reversed(down)]:
        raise _refuse("up_block_types", cfg["up_block_types"], "must mirror down_block_types")
    for name in ("only_cross_attention", "mid_block_only_cross_attention"):
        value = cfg[name]
        if any(value) if isinstance(value, (list, tuple)) else value:
            raise _refuse(name, value, "our transformers always self-attend")
    attn_levels = [i for i, t in enumerate(down) if t == _CROSS_DOWN]
    every = list(range(len(widths)))
    with_mid = [*attn_levels, len(widths) - 1]
    if cfg["norm_num_groups"] is None:
        raise _refuse("norm_num_groups", None, "our UNet always has GroupNorms")
    return {
        "in_channels": cfg["in_channels"],
        "out_channels": cfg["out_channels"],
        "model_channels": c0,
        "channel_mult": [w // c0 for w in widths],
        "num_res_blocks": _uniform("layers_per_block", cfg["layers_per_block"], every, len(widths)),
        "attention_resolutions": [2**i for i in attn_levels],
        **_heads(cfg, widths, attn_levels),
        "context_dim": _uniform("cross_attention_dim", cfg["cross_attention_dim"], with_mid, len(widths)),
        "dropout": float(cfg["dropout"]),
        "norm_groups": cfg["norm_num_groups"],
        "transformer_depth": _uniform(
            "transformer_layers_per_block", cfg["transformer_layers_per_block"], with_mid, len(widths)
        ),
        "use_linear_projection": bool(cfg["use_linear_projection"]),
        "upcast_attention": bool(cfg["upcast_attention"]),
        "norm_eps": float(cfg["norm_eps"]),
    }


def unet_to_diffusers_config(unet: UNet, sample_size: int | None = None) -> dict[str, Any]:
    """Our UNet -> a ``UNet2DConditionModel`` config dict (``UNet2DConditionModel(**config)`` builds it).

    Refuses (one-line ValueError) what diffusers' model cannot express: an unconditional UNet
    (context_dim=None) and GroupNorms whose group count is not ``norm_groups`` (our ``group_norm`` falls
    back to gcd(norm_groups, channels); diffusers needs norm_groups to divide every width).
    """
    if unet.context_dim is None:
        raise ValueError(
            "UNet context_dim=None (unconditional) has no UNet2DConditionModel equivalent; give it a "
            "context_dim"
        )
    for name, mod in unet.named_modules():
        if isinstance(mod, nn.GroupNorm) and mod.num_groups != unet.norm_groups:
            raise ValueError(
                f"UNet norm_groups={unet.norm_groups} does not divide the {mod.num_channels} channels of "
                f"{name}; "
                "diffusers needs norm_num_groups to divide every width"
            )
    levels = len(unet.channel_mult)
    widths = [unet.model_channels * m for m in unet.channel_mult]
    down = [_CROSS_DOWN if 2**i in unet.attention_resolutions else _PLAIN_DOWN for i in range(levels)]
    if unet.num_head_channels is None:
        heads: int | list[int] = unet.num_heads
    else:
        heads = [max(1, w // unet.num_head_channels) for w in widths]
    return {
        "sample_size": sample_size,
        "in_channels": unet.in_channels,
        "out_channels": unet.out_channels,
        "down_block_types": down,
        "up_block_types": [_UP_OF[t] for t in reversed(down)],
        "only_cross_attention": False,
        "mid_block_only_cross_attention": None,
        "block_out_channels": widths,
        "layers_per_block": unet.num_res_blocks,
        "dropout": unet.dropout,
        "norm_num_groups": unet.norm_groups,
        "norm_eps": unet.norm_eps,
        "cross_attention_dim": unet.context_dim,
        "transformer_layers_per_block": unet.transformer_depth,
        "attention_head_dim": heads,
        "use_linear_projection": unet.use_linear_projection,
        "upcast_attention": unet.upcast_attention,
        **_FIXED,
    }


def _load_diffusers_unet(path: str | Path) -> nn.Module:
    """A ``UNet2DConditionModel`` from a UNet directory (config.json) or a pipeline directory (unet/)."""
    from diffusers import UNet2DConditionModel

    path = Path(path)
    if (path / "config.json").is_file():
        return UNet2DConditionModel.from_pretrained(path)
    if (path / "unet" / "config.json").is_file():
        return UNet2DConditionModel.from_pretrained(path, subfolder="unet")
    raise FileNotFoundError(
        f"no diffusers UNet at {path}: expected {path}/config.json or {path}/unet/config.json "
        "(a UNet2DConditionModel or pipeline directory saved with save_pretrained)"
    )


def unet_from_diffusers(unet_or_dir: nn.Module | str | Path) -> tuple[UNet, ConversionReport]:
    """A diffusers ``UNet2DConditionModel`` (or a directory holding one) -> (our UNet in float32, report).

    The weights are copied (the source model is left untouched); ``report.unet_kwargs`` are the arguments
    to put in a ``net`` config so that a checkpoint of this UNet loads.
    """
    source = unet_or_dir if isinstance(unet_or_dir, nn.Module) else _load_diffusers_unet(unet_or_dir)
    config = dict(source.config)
    kwargs = diffusers_config_to_unet_kwargs(config)
    net = UNet(**kwargs)
    state = convert_state_dict(source.state_dict(), net, "diffusers", "ours")
    net.load_state_dict(state, strict=True)
    dtype = next(source.parameters()).dtype
    report = ConversionReport(
        unet_kwargs=kwargs,
        num_tensors=len(state),
        source_dtype=str(dtype).removeprefix("torch."),
        ignored_fields={k: config[k] for k in _IGNORED if k in config},
    )
    log.info("converted a diffusers UNet: %d tensors, kwargs %s", report.num_tensors, kwargs)
    return net.train(source.training), report


def unet_to_diffusers(unet: UNet, sample_size: int | None = None) -> nn.Module:
    """Our UNet -> a diffusers ``UNet2DConditionModel`` with the same weights (copied) and dtype.

    ``sample_size`` (latent side) is only stored in the config; pipelines read it for their default size.
    """
    from diffusers import UNet2DConditionModel

    config = unet_to_diffusers_config(unet, sample_size)
    dtype = next(unet.parameters()).dtype
    model = UNet2DConditionModel(**config)
    state = convert_state_dict(unet.state_dict(), unet, "ours", "diffusers")
    model.load_state_dict(state, strict=True)
    if dtype != torch.float32:  # built in float32; diffusers warns on every .to(dtype)
        model = model.to(dtype)
    return model.train(unet.training)


__all__ = [
    "ConversionReport",
    "convert_state_dict",
    "diffusers_config_to_unet_kwargs",
    "unet_from_diffusers",
    "unet_to_diffusers",
    "unet_to_diffusers_config",
]
