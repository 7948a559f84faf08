"""Export a trained checkpoint to a diffusers pipeline and check that diffusers samples the images we do.

    python scripts/export_check.py --ckpt logs/train/runs/<run>/checkpoints/last.ckpt \
        [--out docs/images/export_parity.png] [--export exported/emoji_sd] [--steps 50] [--cfg 3]

1. ``prepare.py export-diffusers`` (EMA weights) into ``--export`` (default: a temporary directory);
2. ``StableDiffusionPipeline.from_pretrained(dir, local_files_only=True)`` (no hub), and which classes it
   built (the MiniLM text encoder comes back as transformers' ``BertModel``);
3. the same prompts, initial latents (``ldm.generate.initial_noise`` of the same seeds), DDIM grid (leading
   spacing, steps_offset 1: the exported scheduler config) and classifier-free guidance scale through our
   ``generate`` + ``sample_ddim`` and through the pipeline with its ``DDIMScheduler``;
4. prints the largest absolute difference of the images in [0, 1] (goal <= 1e-3) as one JSON line, and
   writes a picture: our row, diffusers' row, and the absolute difference x 100.

A model trained with ``conditioner.mask_padding=true`` (the default) hides padding tokens from its UNet,
which a StableDiffusionPipeline cannot do: pass ``--allow-padding-attention`` to export it anyway and see how
much that changes (export a model trained with ``conditioner.mask_padding=false`` for parity).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import sys
import tempfile
from pathlib import Path

import torch
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import prepare  # noqa: E402
from ldm.generate import generate, initial_noise  # noqa: E402
from ldm.lit.loading import load_for_sampling  # noqa: E402
from ldm.sampling import sample_ddim  # noqa: E402
from ldm.sampling.grids import sampling_sigmas  # noqa: E402

PROMPTS = ["red apple", "grinning face", "blue heart", "dog face", "pizza", "rocket", "snowman", "sun"]
log = logging.getLogger("export_check")


def ours_and_diffusers(
    ckpt: Path, export: Path, args: argparse.Namespace
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(our images, diffusers' images), both (B, 3, H, W) in [0, 1], and what the pipeline was built from."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    model = load_for_sampling(ckpt, use_ema=True, device=torch.device("cpu"))
    seeds = list(range(args.seed, args.seed + len(args.prompts)))
    shape = model.latent_shape
    ours = generate(
        model.denoiser,
        model.conditioner,
        model.decode_samples,
        args.prompts,
        sampler=functools.partial(sample_ddim),
        sigmas=sampling_sigmas(model.denoiser.schedule, args.steps),
        latent_shape=shape,
        seeds=seeds,
        cfg_scale=args.cfg,
    )
    pipe = StableDiffusionPipeline.from_pretrained(export, local_files_only=True)
    if not isinstance(pipe.scheduler, DDIMScheduler):
        raise SystemExit(f"{export} has a {type(pipe.scheduler).__name__}: export it again with this ldm")
    size = int(model.config["image_size"])
    ref = pipe(
        args.prompts,
        num_inference_steps=args.steps,
        guidance_scale=args.cfg,
        height=size,
        width=size,
        output_type="pt",
        latents=initial_noise(seeds, shape, torch.device("cpu")),
    ).images
    index = json.loads((export / "model_index.json").read_text())
    parts = {
        name: type(getattr(pipe, name)).__name__ for name in ("unet", "vae", "text_encoder", "tokenizer")
    }
    return ours, ref, {"model_index_text_encoder": index["text_encoder"], "loaded": parts}


def picture(ours: torch.Tensor, ref: torch.Tensor, path: Path, zoom: int = 4) -> None:
    """Rows: ours, diffusers, |ours - diffusers| x 100 (clipped); each image scaled ``zoom`` x (nearest)."""
    rows = [("ours", ours), ("diffusers", ref), ("|diff| x100", ((ours - ref).abs() * 100).clamp(0, 1))]
    n, _, h, w = ours.shape
    label_w, pad = 84, 2
    cell_h, cell_w = h * zoom + pad, w * zoom + pad
    canvas = Image.new("RGB", (label_w + n * cell_w, len(rows) * cell_h), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (name, images) in enumerate(rows):
        draw.text((4, r * cell_h + cell_h // 2 - 6), name, fill="black")
        for i, img in enumerate(images):
            array = (img.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype("uint8")
            tile = Image.fromarray(array).resize((w * zoom, h * zoom), Image.NEAREST)
            canvas.paste(tile, (label_w + i * cell_w, r * cell_h))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True, type=Path)
    parser.add_argument(
        "--export", type=Path, help="the exported pipeline dir (new or empty; default: temporary)"
    )
    parser.add_argument("--out", type=Path, default=Path("docs/images/export_parity.png"))
    parser.add_argument("--prompts", nargs="+", default=PROMPTS)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--cfg", type=float, default=3.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--allow-padding-attention", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    with tempfile.TemporaryDirectory() as tmp:
        export = args.export or Path(tmp) / "pipeline"
        prepare.main(
            ["export-diffusers", "--ckpt", str(args.ckpt), "--out", str(export)]
            + (["--allow-padding-attention"] if args.allow_padding_attention else [])
        )
        ours, ref, parts = ours_and_diffusers(args.ckpt, export, args)
    picture(ours, ref, args.out)
    result = {
        "ckpt": str(args.ckpt),
        "steps": args.steps,
        "cfg": args.cfg,
        "scheduler": "DDIM",
        "images": len(args.prompts),
        "max_abs_diff": float((ours - ref).abs().max()),
        "mean_abs_diff": float((ours - ref).abs().mean()),
        "picture": str(args.out),
        **parts,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
