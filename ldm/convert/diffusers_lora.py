"""Our LoRA adapters (``ldm.lora``, peft on our UNet) -> diffusers/peft LoRA weights that
``StableDiffusionPipeline.load_lora_weights`` reads (``prepare.py export-lora``).

diffusers' peft format names a UNet adapter by the adapted module's diffusers path:
``unet.<module>.lora_A.weight`` (r, in) and ``unet.<module>.lora_B.weight`` (out, r), with no alpha stored
(``load_lora_weights`` then uses lora_alpha = r, i.e. scale 1). We fold our alpha / r into B, so that
W + B' A is the merged weight at LoRA strength 1 and ``pipe.fuse_lora(lora_scale=s)`` or
``cross_attention_kwargs={"scale": s}`` gives strength s, as ``sample.py lora_scale=s`` does (Hu et al. 2022,
Eq. 3: h = W x + (alpha / r) B A x). Our modules are diffusers' module for module (Linear or conv alike), so
the adapter tensors keep their shapes; only the names change.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from ldm.convert.diffusers_unet import diffusers_config_to_unet_kwargs, unet_to_diffusers_config
from ldm.convert.unet_keys import key_map, meta_unet
from ldm.lora import lora_delta_weights

WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # the file name load_lora_weights(dir) looks for
INFO_NAME = "ldm_lora.json"  # our settings and the base reference, for people (diffusers ignores it)


def lora_to_diffusers(net: nn.Module) -> dict[str, Tensor]:
    """A LoRA-wrapped UNet -> {``<diffusers module>.lora_A.weight``: A, ``<...>.lora_B.weight``: B alpha/r}
    (UNet-relative names; ``save_lora_weights`` adds the ``unet.`` prefix)."""
    deltas = lora_delta_weights(net)
    if not deltas:
        raise ValueError("the net has no LoRA adapters: export a checkpoint trained with model.lora.rank>=1")
    plain = meta_unet(diffusers_config_to_unet_kwargs(unet_to_diffusers_config(net)))  # names without peft's
    names = key_map(plain, "diffusers")
    out: dict[str, Tensor] = {}
    for layer, (b, a) in deltas.items():  # Linear: b (out, r), a (r, in); conv: (out, r, 1, 1), (r, in, k, k)
        theirs = names.get(f"{layer}.weight")
        if theirs is None:
            raise ValueError(
                f"LoRA layer {layer} has no diffusers equivalent: train with model.lora.target_modules among "
                f"the "
                "UNet's layers, e.g. [to_q,to_k,to_v,to_out.0]"
            )
        module = theirs.removesuffix(".weight")
        out[f"{module}.lora_A.weight"] = a.detach().float().contiguous().clone()
        out[f"{module}.lora_B.weight"] = b.detach().float().contiguous().clone()
    return out


def save_diffusers_lora(out: str | Path, net: nn.Module, info: Mapping[str, Any] | None = None) -> Path:
    """Write ``out/pytorch_lora_weights.safetensors`` (+ ``ldm_lora.json`` with ``info``); ``out`` must be new
    or empty. Returns the weights file."""
    from diffusers import StableDiffusionPipeline

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"--out {out} exists and is not empty: choose another --out")
    state = lora_to_diffusers(net)
    StableDiffusionPipeline.save_lora_weights(out, unet_lora_layers=state, weight_name=WEIGHT_NAME)
    if info is not None:
        (out / INFO_NAME).write_text(json.dumps(dict(info), indent=2, default=str) + "\n")
    return out / WEIGHT_NAME
