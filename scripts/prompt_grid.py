"""A labelled picture of a checkpoint: one row per prompt, one column per seed (used for the README image).

python scripts/prompt_grid.py --ckpt latest --out docs/images/default_samples.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from ldm.lit.loading import load_for_sampling, resolve_checkpoint
from ldm.pipeline import generate, to_pil
from ldm.sampling.grids import sampling_sigmas
from ldm.sampling.samplers import sample_ddim

PROMPTS = [
    "red apple",
    "green apple",
    "blue heart",
    "yellow heart",
    "grinning face",
    "fire",
    "sun",
    "dog face",
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ckpt", default="latest")
    parser.add_argument("--out", default="docs/images/default_samples.png")
    parser.add_argument("--seeds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--cfg-scale", type=float, default=5.0)
    parser.add_argument("--zoom", type=int, default=3)
    args = parser.parse_args()
    model = load_for_sampling(resolve_checkpoint(args.ckpt, "logs"), use_ema=True, device=torch.device("cpu"))
    size = int(model.config["image_size"])
    prompts = [p for p in PROMPTS for _ in range(args.seeds)]
    images = generate(model.denoiser, model.conditioner, model.autoencoder.decode, prompts, sampler=sample_ddim,
                      sigmas=sampling_sigmas(model.denoiser.schedule, args.steps), latent_shape=model.latent_shape,
                      seeds=list(range(args.seeds)) * len(PROMPTS), cfg_scale=args.cfg_scale)  # fmt: skip
    tile, label_w = size * args.zoom, 110
    canvas = Image.new("RGB", (label_w + args.seeds * (tile + 2), len(PROMPTS) * (tile + 2)), "white")
    draw = ImageDraw.Draw(canvas)
    for i, im in enumerate(to_pil(images)):
        r, c = divmod(i, args.seeds)
        canvas.paste(
            im.resize((tile, tile), Image.Resampling.NEAREST), (label_w + c * (tile + 2), r * (tile + 2))
        )
        if c == 0:
            draw.text((6, r * (tile + 2) + tile // 2 - 6), PROMPTS[r], fill=(0, 0, 0))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    canvas.save(args.out)
    print(
        f"wrote {args.out} from {model.checkpoint} ({args.steps} DDIM steps, cfg {args.cfg_scale}, seeds 0..{args.seeds - 1})"
    )


if __name__ == "__main__":
    main()
