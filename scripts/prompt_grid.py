"""A labelled picture of a checkpoint: one row per prompt, one column per seed (used for the README image).

python scripts/prompt_grid.py --ckpt latest --out docs/images/default_samples.png [--sampler euler_ancestral
unipc --steps 50 25]

The checkpoint's stored config may only name the project's own classes (ldm/safe_config.py) unless
--trust-checkpoint-config is given; the samplers come from this repository's configs/sampler/*.yaml.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from omegaconf import OmegaConf
from PIL import Image, ImageDraw

from ldm.cli import exit_on_user_error
from ldm.generate import generate, to_pil
from ldm.instantiate import build
from ldm.lit.loading import load_for_sampling, resolve_checkpoint
from ldm.sampling.grids import sampling_sigmas

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

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


def panel(model, sampler_name: str, steps: int, spacing: str | None, args: argparse.Namespace) -> Image.Image:
    """One labelled grid: a row per prompt, a column per seed, a title with the sampler settings."""
    size = int(model.config["image_size"])
    prompts = [p for p in PROMPTS for _ in range(args.seeds)]
    sampler = build(OmegaConf.load(CONFIGS / "sampler" / f"{sampler_name}.yaml"))
    sigmas = sampling_sigmas(model.denoiser.schedule, steps, spacing)
    images = generate(
        model.denoiser,
        model.conditioner,
        model.decode_samples,
        prompts,
        sampler=sampler,
        sigmas=sigmas,
        latent_shape=model.latent_shape,
        seeds=list(range(args.seeds)) * len(PROMPTS),
        cfg_scale=args.cfg_scale,
    )
    tile, label_w, title_h = size * args.zoom, 110, 20
    canvas = Image.new(
        "RGB", (label_w + args.seeds * (tile + 2), title_h + len(PROMPTS) * (tile + 2)), "white"
    )
    draw = ImageDraw.Draw(canvas)
    draw.text((label_w, 4), f"{sampler_name}, {steps} steps, {spacing or 'default'} spacing", fill=(0, 0, 0))
    for i, im in enumerate(to_pil(images)):
        r, c = divmod(i, args.seeds)
        y = title_h + r * (tile + 2)
        canvas.paste(im.resize((tile, tile), Image.Resampling.NEAREST), (label_w + c * (tile + 2), y))
        if c == 0:
            draw.text((6, y + tile // 2 - 6), PROMPTS[r], fill=(0, 0, 0))
    return canvas


@exit_on_user_error
def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ckpt", default="latest")
    parser.add_argument("--out", default="docs/images/default_samples.png")
    parser.add_argument("--seeds", type=int, default=6)
    parser.add_argument(
        "--sampler", nargs="+", default=["euler_ancestral", "unipc"], help="configs/sampler/*.yaml names"
    )
    parser.add_argument("--steps", type=int, nargs="+", default=[50, 25], help="one per sampler")
    parser.add_argument(
        "--spacing", default=None, help="leading | trailing | linspace | karras (default: the schedule's)"
    )
    parser.add_argument("--cfg-scale", type=float, default=3.0)
    parser.add_argument("--zoom", type=int, default=3)
    parser.add_argument(
        "--trust-checkpoint-config",
        action="store_true",
        help="build the checkpoint's stored config even if it names code outside ldm/safe_config.py's "
        "allowlist",
    )
    args = parser.parse_args()
    if len(args.steps) != len(args.sampler):
        raise SystemExit("give one --steps value per --sampler")
    model = load_for_sampling(
        resolve_checkpoint(args.ckpt, "logs"),
        use_ema=True,
        device=torch.device("cpu"),
        trust_checkpoint_config=args.trust_checkpoint_config,
    )
    panels = [
        panel(model, name, steps, args.spacing, args)
        for name, steps in zip(args.sampler, args.steps, strict=True)
    ]
    canvas = Image.new(
        "RGB", (sum(p.width for p in panels) + 20 * (len(panels) - 1), panels[0].height), "white"
    )
    for i, p in enumerate(panels):
        canvas.paste(p, (i * (p.width + 20), 0))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    canvas.save(args.out)
    print(
        f"wrote {args.out} from {model.checkpoint} ({args.sampler}, {args.steps} steps, cfg {args.cfg_scale})"
    )


if __name__ == "__main__":
    main()
