"""Our stage-1 KL autoencoder (``ldm.autoencoder.kl.KLAutoencoder``) <-> diffusers' ``AutoencoderKL``.

The two are the same network (Rombach et al. 2022, appendix G): ResNet blocks with GroupNorm(eps 1e-6) + SiLU,
stride-2 convs padded (0, 1, 0, 1) down, nearest x2 + conv up, an optional single-head self-attention in both
middle blocks, 1x1 quant convs. Weights are renames, except our attention's fused 1x1 ``qkv`` conv (3C, C, 1,
1), which is diffusers' ``to_q``/``to_k``/``to_v`` Linear weights (C, C) stacked, and ``proj`` (C, C, 1, 1),
their ``to_out.0`` (C, C). Converting there and back gives the same tensors bit for bit.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ldm.autoencoder.kl import AttnBlock, Downsample, KLAutoencoder, ResBlock, Upsample

_RES = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "skip": "conv_shortcut"}


def kl_to_diffusers_config(model: KLAutoencoder, scaling_factor: float, sample_size: int = 32) -> dict:
    """``AutoencoderKL(**config)`` builds the same architecture; ``scaling_factor`` is our
    ``scale_factor``."""
    cfg = model.config()
    widths = [cfg["base_channels"] * m for m in cfg["channel_mult"]]
    return {
        "in_channels": cfg["in_channels"],
        "out_channels": cfg["in_channels"],
        "down_block_types": ["DownEncoderBlock2D"] * len(widths),
        "up_block_types": ["UpDecoderBlock2D"] * len(widths),
        "block_out_channels": widths,
        "layers_per_block": cfg["num_res_blocks"],
        "act_fn": "silu",
        "latent_channels": cfg["z_channels"],
        "norm_num_groups": cfg["norm_groups"],
        "sample_size": sample_size,
        "scaling_factor": float(scaling_factor),
        "mid_block_add_attention": cfg["mid_attention"],
        "use_quant_conv": True,
        "use_post_quant_conv": True,
    }


def _module_map(model: KLAutoencoder) -> dict[str, str]:
    """Our module path -> diffusers module path, for every block that holds tensors."""
    out = {"quant_conv": "quant_conv", "post_quant_conv": "post_quant_conv"}
    for half, seq, kind in (("encoder", "down", "down_blocks"), ("decoder", "up", "up_blocks")):
        coder = getattr(model, half)
        out.update(
            {
                f"{half}.conv_in": f"{half}.conv_in",
                f"{half}.norm_out": f"{half}.conv_norm_out",
                f"{half}.conv_out": f"{half}.conv_out",
            }
        )
        for i, name in enumerate(("resnets.0", "attentions.0", "resnets.1")):
            out[f"{half}.mid.{i}"] = f"{half}.mid_block.{name}"
        level = index = 0
        for n, module in enumerate(getattr(coder, seq)):  # ResBlocks of a level, then its resampler
            if isinstance(module, (Downsample, Upsample)):
                sampler = "downsamplers" if half == "encoder" else "upsamplers"
                out[f"{half}.{seq}.{n}"] = f"{half}.{kind}.{level}.{sampler}.0"
                level, index = level + 1, 0
            else:
                out[f"{half}.{seq}.{n}"] = f"{half}.{kind}.{level}.resnets.{index}"
                index += 1
    return out


def key_map(model: KLAutoencoder) -> dict[str, tuple[str | tuple[str, str, str], str]]:
    """Our tensor name -> (diffusers name, or the (to_q, to_k, to_v) names for ``qkv``; how: plain | linear |
    qkv)."""
    modules = dict(model.named_modules())
    out: dict[str, tuple[Any, str]] = {}
    for ours, theirs in _module_map(model).items():
        module = modules[ours]
        for name, _ in module.named_parameters():
            head, tail = name.split(".", 1) if "." in name else ("", name)
            if isinstance(module, ResBlock):
                out[f"{ours}.{name}"] = (f"{theirs}.{_RES[head]}.{tail}", "plain")
            elif isinstance(module, AttnBlock) and head == "norm":
                out[f"{ours}.{name}"] = (f"{theirs}.group_norm.{tail}", "plain")
            elif isinstance(module, AttnBlock) and head == "proj":
                out[f"{ours}.{name}"] = (f"{theirs}.to_out.0.{tail}", "linear")
            elif isinstance(module, AttnBlock):
                out[f"{ours}.{name}"] = (
                    tuple(f"{theirs}.{p}.{tail}" for p in ("to_q", "to_k", "to_v")),
                    "qkv",
                )
            else:
                out[f"{ours}.{name}"] = (f"{theirs}.{name}", "plain")
    missing = set(model.state_dict()) - set(out)
    if missing:
        raise RuntimeError(
            f"KL autoencoder tensors without a diffusers name: {sorted(missing)[:3]} (a converter bug)"
        )
    return out


def kl_to_diffusers_state(model: KLAutoencoder) -> dict[str, Tensor]:
    """Our KL autoencoder's tensors under ``AutoencoderKL`` names: the same values (1x1 convs as Linear
    weights)."""
    state = model.state_dict()
    out: dict[str, Tensor] = {}
    for ours, (theirs, how) in key_map(model).items():
        value = state[ours].detach()
        if how == "qkv":  # (3C, C, 1, 1) / (3C,) -> three (C, C) / (C,)
            for name, part in zip(theirs, value.chunk(3, dim=0), strict=True):
                out[name] = part.flatten(1) if part.ndim == 4 else part
        else:
            out[theirs] = value.flatten(1) if how == "linear" and value.ndim == 4 else value
    return out


def kl_from_diffusers_state(state: Mapping[str, Tensor], model: KLAutoencoder) -> dict[str, Tensor]:
    """``AutoencoderKL`` tensors -> our state dict for ``model``'s architecture (the inverse, bit for bit)."""
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    mapping = key_map(model)
    wanted = {n for theirs, _ in mapping.values() for n in ((theirs,) if isinstance(theirs, str) else theirs)}
    if set(state) != wanted:
        raise ValueError(
            f"AutoencoderKL tensors do not fit KLAutoencoder{model.config()}: missing "
            f"{sorted(wanted - set(state))[:3]}, unexpected {sorted(set(state) - wanted)[:3]}; build the "
            f"KLAutoencoder from kl_from_diffusers_config"
        )
    out: dict[str, Tensor] = {}
    for ours, (theirs, how) in mapping.items():
        value = torch.cat([state[n] for n in theirs]) if how == "qkv" else state[theirs]
        out[ours] = value.reshape(shapes[ours])
    return out


def kl_from_diffusers_config(config: Mapping[str, Any]) -> KLAutoencoder:
    """A KLAutoencoder of an ``AutoencoderKL`` config this module writes (the blocks and norms it can
    express)."""
    widths = list(config["block_out_channels"])
    if any(w % widths[0] for w in widths) or config.get("act_fn", "silu") != "silu":
        raise ValueError(f"AutoencoderKL block_out_channels={widths} / act_fn: not a KLAutoencoder layout")
    return KLAutoencoder(
        in_channels=config["in_channels"],
        base_channels=widths[0],
        channel_mult=[w // widths[0] for w in widths],
        num_res_blocks=config["layers_per_block"],
        z_channels=config["latent_channels"],
        norm_groups=config["norm_num_groups"],
        mid_attention=config.get("mid_block_add_attention", True),
    )


def kl_to_diffusers(model: KLAutoencoder, scaling_factor: float, sample_size: int = 32) -> nn.Module:
    """Our KL autoencoder -> a diffusers ``AutoencoderKL`` with the same weights (copied) in eval mode."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(**kl_to_diffusers_config(model, scaling_factor, sample_size))
    vae.load_state_dict(kl_to_diffusers_state(model), strict=True)
    return vae.eval()
