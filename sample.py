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
from ldm.lit.loading import load_for_sampling, resolve_checkpoint
from ldm.pipeline import generate, make_grid, to_pil
from ldm.sampling.grids import sampling_sigmas

log = logging.getLogger("sample")


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


def slug(text: str, n: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:n] or "empty"


def run(cfg: DictConfig) -> list[dict[str, Any]]:
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    )
    ckpt_path = resolve_checkpoint(str(cfg.ckpt), cfg.log_dir)
    model = load_for_sampling(ckpt_path, cfg.use_ema, device)
    prompts = read_prompts(cfg)
    sigmas = sampling_sigmas(model.denoiser.schedule, cfg.steps, spacing=cfg.spacing)
    # no sampler= given: the one the checkpoint's sample grid used in training
    sampler_cfg = cfg.sampler if cfg.sampler is not None else OmegaConf.create(model.config["sampler"])
    sampler = build(sampler_cfg)
    interval = list(cfg.guidance_interval) if cfg.guidance_interval is not None else None
    sampler_settings = {
        "sampler": OmegaConf.to_container(sampler_cfg),
        "steps": cfg.steps,
        "spacing": cfg.spacing,
        "cfg_scale": cfg.cfg_scale,
        "guidance_rescale": cfg.guidance_rescale,
        "guidance_interval": interval,
    }
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    records: list[dict[str, Any]] = []
    pil_images = []
    for start in range(0, len(prompts), cfg.batch_size):
        batch = prompts[start : start + cfg.batch_size]
        seeds = [cfg.seed + start + i for i in range(len(batch))]
        images = generate(
            model.denoiser,
            model.conditioner,
            model.autoencoder.decode,
            batch,
            sampler=sampler,
            sigmas=sigmas,
            latent_shape=model.latent_shape,
            seeds=seeds,
            cfg_scale=cfg.cfg_scale,
            guidance_rescale=cfg.guidance_rescale,
            guidance_interval=interval,
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
