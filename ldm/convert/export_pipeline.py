"""A trained model's parts -> a diffusers ``StableDiffusionPipeline`` directory
(``prepare.py export-diffusers``).

What is written (``save_pretrained``, safetensors): ``unet/`` (our UNet through ``unet_to_diffusers``; the EMA
weights when the caller loaded them), ``vae/`` (our KL autoencoder as ``AutoencoderKL``, or the diffusers VAE
we were trained on, with ``scaling_factor`` = our scale), ``text_encoder/`` + ``tokenizer/`` (the frozen
Hugging Face encoder as it is, e.g. MiniLM as ``BertModel`` + ``BertTokenizerFast``: diffusers loads any
transformers class the model_index.json names; the tokenizer's ``model_max_length`` is our ``max_length``, as
the pipeline pads to it), ``scheduler/`` (a DDIMScheduler config of our schedule and prediction type; any
DDPM-family scheduler's ``from_config`` reads it) and ``model_index.json``. No safety checker.

Refused with a one-line error naming the fix: what a Stable Diffusion pipeline cannot compute the same way —
a per-channel ``latent_norm`` (the pipeline divides latents by one ``scaling_factor``; an all-channels-equal
std with zero means is folded into it), an autoencoder ``shift_factor`` (ignored by the pipeline), a non-DDPM
schedule, a conditioner that is not a text encoder, and, unless ``allow_padding_attention``, a text
conditioner that masks padding tokens (the pipeline's UNet attends to them: train with
``conditioner.mask_padding=false``).
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

from torch import nn

from ldm.convert.diffusers_scheduler import scheduler_config_from_schedule
from ldm.convert.diffusers_unet import unet_to_diffusers

log = logging.getLogger(__name__)


def folded_scaling_factor(scale: float, shift: float, latent_norm: Any) -> float:
    """The one ``scaling_factor`` with which ``latents / scaling_factor`` is what our decoder sees, or an
    error.

    Ours decodes ``model((x * std + mean) / scale + shift)``; the pipeline ``vae.decode(x / scaling_factor)``:
    equal for every x iff shift = 0, every mean = 0 and every std = s, with scaling_factor = scale / s."""
    if shift != 0.0:
        raise ValueError(
            f"the autoencoder has shift_factor={shift}, which StableDiffusionPipeline ignores: export a "
            f"model "
            "trained with autoencoder.shift_factor=0"
        )
    if latent_norm is None or latent_norm.is_identity:
        return float(scale)
    stds = {float(s) for s in latent_norm.std}
    if any(float(m) != 0.0 for m in latent_norm.mean) or len(stds) != 1:
        raise ValueError(
            "the model normalises latents per channel (model.latent_norm), which a Stable Diffusion pipeline "
            "cannot express (one scaling_factor, no shift): export a model trained with "
            "model.latent_norm=none"
        )
    return float(scale) / stds.pop()


def _diffusers_vae(autoencoder: nn.Module, scaling_factor: float, image_size: int) -> nn.Module:
    from ldm.autoencoder.frozen import DiffusersAutoencoderAdaptor
    from ldm.autoencoder.kl import KLAutoencoder
    from ldm.convert.diffusers_vae import kl_to_diffusers

    model = autoencoder.model
    if isinstance(model, KLAutoencoder):
        return kl_to_diffusers(model, scaling_factor, sample_size=image_size)
    if isinstance(model, DiffusersAutoencoderAdaptor):
        vae = copy.deepcopy(model.vae)
        vae.register_to_config(scaling_factor=scaling_factor, shift_factor=None)
        return vae
    raise ValueError(
        f"autoencoder {type(model).__name__} has no diffusers AutoencoderKL equivalent: export a model "
        f"trained with "
        "autoencoder=kl|emoji_kl_f4|diffusers"
    )


def _text_parts(conditioner: nn.Module, allow_padding_attention: bool) -> tuple[nn.Module, Any]:
    from ldm.conditioning.text import TextConditioner

    if not isinstance(conditioner, TextConditioner):
        raise ValueError(
            f"conditioner {type(conditioner).__name__} is not a text encoder: a StableDiffusionPipeline "
            f"needs one "
            "(export a model trained with conditioner=minilm|clip)"
        )
    if conditioner.mask_padding and not allow_padding_attention:
        raise ValueError(
            "the model was trained with conditioner.mask_padding=true (padding tokens hidden from the UNet); "
            "StableDiffusionPipeline attends to them, so its images would differ: fine-tune with "
            "conditioner.mask_padding=false, or pass --allow-padding-attention to export anyway"
        )
    tokenizer = copy.deepcopy(conditioner.tokenizer)
    tokenizer.model_max_length = conditioner.max_length  # the pipeline pads and truncates to this
    return conditioner.encoder, tokenizer


def build_sd_pipeline(
    denoiser: nn.Module,
    conditioner: nn.Module,
    autoencoder: nn.Module,
    *,
    image_size: int,
    latent_norm: Any = None,
    allow_padding_attention: bool = False,
) -> Any:
    """A ``StableDiffusionPipeline`` (in memory) with our weights; every refusal happens before anything
    heavy."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    scheduler_config = scheduler_config_from_schedule(denoiser.schedule, denoiser.prediction)
    scaling = folded_scaling_factor(autoencoder.scale_factor, autoencoder.shift_factor, latent_norm)
    text_encoder, tokenizer = _text_parts(conditioner, allow_padding_attention)
    vae = _diffusers_vae(autoencoder, scaling, image_size)
    unet = unet_to_diffusers(denoiser.net.float(), sample_size=image_size // autoencoder.downsample_factor)
    scheduler = DDIMScheduler.from_config({k: v for k, v in scheduler_config.items() if k != "_class_name"})
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet.eval(),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def export_sd_pipeline(out: str | Path, **parts: Any) -> Path:
    """``build_sd_pipeline(**parts)`` saved to ``out`` (which must not exist or be empty) as safetensors."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"--out {out} exists and is not empty: choose another --out")
    pipe = build_sd_pipeline(**parts)
    pipe.save_pretrained(out, safe_serialization=True)
    log.info("exported a StableDiffusionPipeline to %s (unet, vae, text_encoder, tokenizer, scheduler)", out)
    return out
