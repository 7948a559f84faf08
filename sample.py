"""Sample a checkpoint: `python sample.py ckpt=PATH prompt="red apple" num_images=8 steps=50 sampler=ddim cfg_scale=5`.

Writes one PNG per image, a grid PNG and metadata.json (file, prompt, negative prompt, seed, sampler settings,
checkpoint) to out_dir. The same seed gives byte-identical PNGs. EMA weights are used unless use_ema=false.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from ldm.instantiate import build
from ldm.lit.checkpoint_io import load_checkpoint_file
from ldm.lit.ema import EMA_KEY
from ldm.pipeline import generate, make_grid, to_pil
from ldm.sampling.sigmas import get_sigmas_discrete

log = logging.getLogger("sample")


def resolve_checkpoint(ckpt: str, log_dir: str) -> Path:
    """``latest`` -> the newest logs/train/runs/*/checkpoints/last.ckpt; anything else is a path."""
    if ckpt != "latest":
        return Path(ckpt)
    candidates = sorted(
        Path(log_dir).glob("train/runs/*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime
    )
    if not candidates:
        raise FileNotFoundError(
            f"ckpt=latest found no {log_dir}/train/runs/*/checkpoints/last.ckpt: run train.py first or pass ckpt=PATH"
        )
    return candidates[-1]


def read_prompts(cfg: DictConfig) -> list[str]:
    if cfg.prompts_file:
        path = Path(cfg.prompts_file)
        if not path.is_file():
            raise FileNotFoundError(
                f"prompts_file not found: '{path}' — give a text file with one prompt per line"
            )
        base = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    elif cfg.prompt is not None:
        base = [str(cfg.prompt)]
    else:
        raise ValueError('no prompt given: pass prompt="red apple" or prompts_file=FILE')
    return [p for p in base for _ in range(cfg.num_images)]


def load_model(ckpt_path: Path, use_ema: bool, device: torch.device) -> tuple[Any, Any, Any, dict]:
    """Rebuild denoiser, conditioner and autoencoder from the config stored in the checkpoint; load (EMA) weights."""
    checkpoint = load_checkpoint_file(ckpt_path)
    config = checkpoint.get("ldm_config")
    if config is None or "denoiser" not in config.get("model", {}):
        raise ValueError(
            f"'{ckpt_path}' is not a latent-diffusion checkpoint written by train.py (no ldm_config.model.denoiser)"
        )
    model_cfg = OmegaConf.create(config["model"])
    denoiser = build(model_cfg.denoiser)
    conditioner = build(model_cfg.conditioner)
    autoencoder = build(model_cfg.autoencoder)
    state = checkpoint["state_dict"]
    if use_ema:
        if EMA_KEY not in checkpoint:
            raise KeyError(f"'{ckpt_path}' has no EMA weights: pass use_ema=false")
        denoiser.net.load_state_dict(checkpoint[EMA_KEY], strict=True)
    else:
        prefix = "denoiser.net."
        denoiser.net.load_state_dict(
            {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}, strict=True
        )
    cond_state = {k[len("conditioner.") :]: v for k, v in state.items() if k.startswith("conditioner.")}
    if (
        cond_state
    ):  # trainable conditioners (class labels) are in the checkpoint; frozen text encoders are not
        conditioner.load_state_dict(cond_state, strict=True)
    for module in (denoiser, conditioner, autoencoder):
        module.to(device).eval()
    return denoiser, conditioner, autoencoder, config


def slug(text: str, n: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:n] or "empty"


def run(cfg: DictConfig) -> list[dict[str, Any]]:
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    )
    ckpt_path = resolve_checkpoint(str(cfg.ckpt), cfg.log_dir)
    denoiser, conditioner, autoencoder, config = load_model(ckpt_path, cfg.use_ema, device)
    prompts = read_prompts(cfg)
    image_size = int(config.get("image_size", 32))
    latent_shape = (
        denoiser.net.in_channels,
        image_size // autoencoder.downsample_factor,
        image_size // autoencoder.downsample_factor,
    )
    sigmas = get_sigmas_discrete(denoiser.schedule, cfg.steps, spacing=cfg.spacing)
    sampler = build(cfg.sampler)
    sampler_settings = {
        "sampler": OmegaConf.to_container(cfg.sampler),
        "steps": cfg.steps,
        "spacing": cfg.spacing,
        "cfg_scale": cfg.cfg_scale,
    }
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    records: list[dict[str, Any]] = []
    pil_images = []
    for start in range(0, len(prompts), cfg.batch_size):
        batch = prompts[start : start + cfg.batch_size]
        seeds = [cfg.seed + start + i for i in range(len(batch))]
        images = generate(
            denoiser,
            conditioner,
            autoencoder.decode,
            batch,
            sampler=sampler,
            sigmas=sigmas,
            latent_shape=latent_shape,
            seeds=seeds,
            cfg_scale=cfg.cfg_scale,
            negative_prompt=[cfg.negative_prompt] * len(batch),
        )
        for i, (prompt, seed, image) in enumerate(zip(batch, seeds, to_pil(images), strict=True)):
            name = f"{start + i:04d}_{slug(prompt)}_seed{seed}.png"
            image.save(out_dir / name)
            pil_images.append(image)
            records.append(
                {
                    "file": name,
                    "prompt": prompt,
                    "negative_prompt": cfg.negative_prompt,
                    "seed": seed,
                    **sampler_settings,
                    "use_ema": cfg.use_ema,
                    "checkpoint": str(ckpt_path.resolve()),
                }
            )
    make_grid(pil_images, ncols=min(8, len(pil_images))).save(out_dir / "grid.png")
    (out_dir / "metadata.json").write_text(json.dumps({"images": records}, indent=2))
    log.info("wrote %d images, grid.png and metadata.json to %s", len(records), out_dir)
    return records


@hydra.main(version_base="1.3", config_path="configs", config_name="sample")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
