"""Rebuild a trained latent-diffusion model for sampling from one checkpoint (its stored config + weights).

The checkpoint is read without unpickling code (``weights_only``), its stored config is checked against the
project's allowlist before anything is built (``ldm.safe_config``), and weights that are NaN/Inf are refused.
Every problem with the file is a one-line ``CheckpointError`` (a ``ValueError``) that names the fix.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn

from ldm.autoencoder.latent_norm import LatentNorm
from ldm.conditioning.multi import MultiConditioner
from ldm.generate import latent_shape
from ldm.instantiate import build
from ldm.lit.checkpoint_io import load_checkpoint_file
from ldm.lit.ema import EMA_KEY
from ldm.lit.lora_base import LORA_KEY, merged_lora_net
from ldm.safe_config import SAMPLING_TARGETS, check_or_trust

MODEL_PARTS = ("denoiser", "conditioner", "autoencoder")
DIVERGED = "the run diverged: resume from an earlier checkpoint or lower the learning rate"


class CheckpointError(ValueError):
    """A checkpoint file that cannot be sampled (unreadable, not from train.py, non-finite weights)."""


@dataclass
class SamplingModel:
    """The parts sampling needs, in eval mode on one device, and the resolved training config.

    ``sampler_config`` is the stored ``sampler`` node (checked like the model's), or None if there is none;
    ``latent_norm`` the training run's per-channel latent normalisation (identity when it had none)."""

    denoiser: nn.Module
    conditioner: nn.Module
    autoencoder: nn.Module
    config: dict[str, Any]
    checkpoint: Path
    sampler_config: dict[str, Any] | None = None
    latent_norm: LatentNorm | None = None
    lora: dict[str, Any] | None = None  # a LoRA checkpoint's settings and base (merged into denoiser)

    def decode_samples(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) diffusion-space latents (a sampler's output) -> images (B, 3, H, W), about [-1, 1]."""
        if self.latent_norm is not None:
            x = self.latent_norm.denormalize(x)
        return self.autoencoder.decode(x)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, C, h, w) diffusion-space latents (``decode_samples`` inverts it)."""
        z = self.autoencoder.encode(images)
        return self.latent_norm.normalize(z) if self.latent_norm is not None else z

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
            f"ckpt=latest found no {log_dir}/train/runs/*/checkpoints/last.ckpt: run train.py first or pass "
            f"ckpt=PATH"
        )
    return runs[-1]


def strip_prefix(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def read_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint dict; an empty, truncated or foreign file is a one-line CheckpointError."""
    fix = "copy it again or pass ckpt=PATH to a .ckpt written by train.py"
    if path.is_file() and path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint '{path}' is empty (0 bytes; an interrupted copy or save?): {fix}")
    try:
        checkpoint = load_checkpoint_file(path)
    except OSError:
        raise  # missing file, permission denied, I/O error: their own message says it
    # on bad bytes torch.load raises EOFError, UnpicklingError, RuntimeError, KeyError, ... (no common base)
    except Exception as err:
        reason = (str(err).strip().splitlines() or [""])[0].split(". ")[0][:160]
        raise CheckpointError(
            f"cannot read checkpoint '{path}' ({type(err).__name__}: {reason}): it is truncated, corrupt, "
            f"not a torch file, or holds objects other than weights: {fix}"
        ) from None
    if not isinstance(checkpoint, dict):
        raise CheckpointError(
            f"'{path}' holds a {type(checkpoint).__name__}, not a checkpoint dict: pass ckpt=PATH to a .ckpt "
            f"written "
            "by train.py"
        )
    return checkpoint


def stored_config(checkpoint: dict[str, Any], path: Path) -> dict[str, Any]:
    config = checkpoint.get("ldm_config")
    model = config.get("model") if isinstance(config, dict) else None
    if not isinstance(model, dict) or not all(isinstance(model.get(k), dict) for k in MODEL_PARTS):
        raise CheckpointError(
            f"'{path}' is not a latent-diffusion checkpoint written by train.py (no "
            f"ldm_config.model.denoiser/"
            "conditioner/autoencoder): pass ckpt=PATH to one (an autoencoder run is sampled through "
            "prepare.py)"
        )
    if not isinstance(checkpoint.get("state_dict"), dict):
        raise CheckpointError(f"'{path}' has no state_dict: pass ckpt=PATH to a .ckpt written by train.py")
    return config


def first_non_finite(groups: dict[str, dict[str, Any]]) -> tuple[int, int, str | None]:
    """(non-finite values, floating values, 'group tensor-name' of the first bad tensor or None)."""
    bad = total = 0
    first = None
    for group, state in groups.items():
        for name, value in state.items():
            if not (isinstance(value, torch.Tensor) and value.is_floating_point()):
                continue
            n = int((~torch.isfinite(value)).sum())
            total += value.numel()
            if n:
                bad += n
                first = first or f"{group} '{name}'"
    return bad, total, first


def check_finite(path: Path, groups: dict[str, dict[str, Any]], raw_net: dict[str, Any] | None) -> None:
    """Refuse NaN/Inf weights (a diverged run); ``raw_net``: the non-EMA net weights when ``groups`` has
    "EMA"."""
    bad, total, first = first_non_finite(groups)
    if not bad:
        return
    hint = ""
    others = {k: v for k, v in groups.items() if k != "EMA"}
    if raw_net is not None and not first_non_finite({**others, "raw": raw_net})[0]:
        hint = "; only the EMA weights are bad: pass use_ema=false to sample the raw weights"
    raise CheckpointError(
        f"checkpoint '{path}' has non-finite weights: {100 * bad / total:.3g}% of {total} values are "
        f"NaN/Inf, first in {first} — {DIVERGED}{hint}"
    )


def load_conditioner_state(conditioner: nn.Module, state: dict[str, Any]) -> None:
    """Load the trained conditioners' weights (class labels); frozen ones (text encoders) are not in
    checkpoints."""
    if not isinstance(conditioner, MultiConditioner):
        conditioner.load_state_dict(state, strict=True)
        return
    frozen = tuple(conditioner.frozen_prefixes(""))
    missing, unexpected = conditioner.load_state_dict(state, strict=False)
    bad = [k for k in missing if not k.startswith(frozen)] + list(unexpected)
    if bad:
        raise RuntimeError(f"conditioner weights do not match: {bad[:3]}")


def load_for_sampling(
    ckpt_path: Path,
    use_ema: bool,
    device: torch.device,
    *,
    trust_checkpoint_config: bool = False,
    lora_scale: float = 1.0,
    lora_base: str | None = None,
) -> SamplingModel:
    """Denoiser (EMA weights unless ``use_ema`` is False), conditioner and autoencoder as configured in
    training.

    The stored model and sampler nodes must only name allowlisted targets (ldm.safe_config) unless
    ``trust_checkpoint_config``; weights must be finite. Both are checked before anything is built. A LoRA
    checkpoint's adapters are merged at strength ``lora_scale`` into its base (recorded path, or
    ``lora_base``), whose sha256 must be the recorded one (``ldm.lit.lora_base``)."""
    ckpt_path = Path(ckpt_path)
    checkpoint = read_checkpoint(ckpt_path)
    config = stored_config(checkpoint, ckpt_path)
    sampler_cfg = config.get("sampler")
    to_check: dict[str, Any] = {"model": {k: config["model"][k] for k in MODEL_PARTS}}
    if sampler_cfg is not None:
        to_check["sampler"] = sampler_cfg
    check_or_trust(
        to_check, SAMPLING_TARGETS, trust=trust_checkpoint_config, source=f"checkpoint '{ckpt_path}'"
    )

    state = checkpoint["state_dict"]
    raw_net = strip_prefix(state, "denoiser.net.")
    if use_ema and not isinstance(checkpoint.get(EMA_KEY), dict):
        raise CheckpointError(f"'{ckpt_path}' has no EMA weights: pass use_ema=false")
    net_state = checkpoint[EMA_KEY] if use_ema else raw_net
    # trainable conditioners (class labels) are in the checkpoint; frozen text encoders are not
    cond_state = strip_prefix(state, "conditioner.")
    check_finite(
        ckpt_path,
        {"EMA" if use_ema else "net": net_state, "conditioner": cond_state},
        raw_net if use_ema else None,
    )

    model_cfg = OmegaConf.create(to_check["model"])
    denoiser, conditioner = build(model_cfg.denoiser), build(model_cfg.conditioner)
    autoencoder = build(model_cfg.autoencoder)
    lora = checkpoint.get(LORA_KEY)
    if lora is not None:
        merged_lora_net(
            denoiser.net,
            lora,
            net_state,
            scale=lora_scale,
            base_path=lora_base,
            schedule=denoiser.schedule,
            prediction=denoiser.prediction,
            where=f"'{ckpt_path}'",
        )
    try:
        if lora is None:
            denoiser.net.load_state_dict(net_state, strict=True)
        if cond_state:
            load_conditioner_state(conditioner, cond_state)
    except RuntimeError as err:
        first_line = str(err).strip().splitlines()[0]
        raise CheckpointError(
            f"'{ckpt_path}' weights do not fit its own config ({first_line}): the file was edited or mixed "
            f"up — "
            "pass ckpt=PATH to an unmodified .ckpt written by train.py"
        ) from None
    latent_norm = LatentNorm(denoiser.net.in_channels)
    norm_state = strip_prefix(state, "latent_norm.")
    if norm_state:  # absent in checkpoints from before latent_norm: identity
        latent_norm.load_state_dict(norm_state, strict=True)
    for module in (denoiser, conditioner, autoencoder, latent_norm):
        module.to(device).eval()
    return SamplingModel(
        denoiser, conditioner, autoencoder, config, ckpt_path, sampler_cfg, latent_norm, lora
    )
