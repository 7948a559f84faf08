"""Rebuild a trained latent-diffusion model for sampling from one checkpoint (its stored config + weights)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn

from ldm.instantiate import build
from ldm.lit.checkpoint_io import load_checkpoint_file
from ldm.lit.ema import EMA_KEY
from ldm.pipeline import latent_shape


@dataclass
class SamplingModel:
    """The parts sampling needs, in eval mode on one device, and the resolved training config."""

    denoiser: nn.Module
    conditioner: nn.Module
    autoencoder: nn.Module
    config: dict[str, Any]
    checkpoint: Path

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return latent_shape(self.denoiser.net, self.autoencoder, int(self.config["image_size"]))


def resolve_checkpoint(ckpt: str, log_dir: str) -> Path:
    """``latest`` -> the newest LOG_DIR/train/runs/*/checkpoints/last.ckpt; anything else is a path."""
    if ckpt != "latest":
        return Path(ckpt)
    runs = sorted(Path(log_dir).glob("train/runs/*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
    if not runs:
        raise FileNotFoundError(
            f"ckpt=latest found no {log_dir}/train/runs/*/checkpoints/last.ckpt: run train.py first or pass ckpt=PATH"
        )
    return runs[-1]


def strip_prefix(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def load_for_sampling(ckpt_path: Path, use_ema: bool, device: torch.device) -> SamplingModel:
    """Denoiser (EMA weights unless ``use_ema`` is False), conditioner and autoencoder as configured in training."""
    checkpoint = load_checkpoint_file(ckpt_path)
    config = checkpoint.get("ldm_config")
    if config is None or "denoiser" not in config.get("model", {}):
        raise ValueError(
            f"'{ckpt_path}' is not a latent-diffusion checkpoint written by train.py (no ldm_config.model.denoiser)"
        )
    model_cfg = OmegaConf.create(config["model"])
    denoiser, conditioner = build(model_cfg.denoiser), build(model_cfg.conditioner)
    autoencoder = build(model_cfg.autoencoder)
    state = checkpoint["state_dict"]
    if use_ema and EMA_KEY not in checkpoint:
        raise KeyError(f"'{ckpt_path}' has no EMA weights: pass use_ema=false")
    net_state = checkpoint[EMA_KEY] if use_ema else strip_prefix(state, "denoiser.net.")
    denoiser.net.load_state_dict(net_state, strict=True)
    # trainable conditioners (class labels) are in the checkpoint; frozen text encoders are not
    if cond_state := strip_prefix(state, "conditioner."):
        conditioner.load_state_dict(cond_state, strict=True)
    for module in (denoiser, conditioner, autoencoder):
        module.to(device).eval()
    return SamplingModel(denoiser, conditioner, autoencoder, config, Path(ckpt_path))
