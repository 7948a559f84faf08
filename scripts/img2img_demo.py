"""A picture of image-to-image (SDEdit) and inpainting with a trained emoji model, through ``sample.py``.

    python scripts/img2img_demo.py --ckpt logs/train/runs/<run>/checkpoints/last.ckpt \
        [--init "red apple"] [--prompt "green apple"] [--out docs/images/img2img.png]

Renders the ``--init`` emoji (OpenMoji, as the training data) as the init image, then runs ``sample.py`` with
``init_image=`` at strengths 0.3 / 0.6 / 0.9 and prompt ``--prompt``, and once with ``mask=`` (white =
repaint: the right half) at strength 1. The picture has one row per seed: init, 0.3, 0.6, 0.9, the mask
(black = keep, grey = repaint), inpainted; each image scaled 4x (nearest).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import sample  # noqa: E402
from ldm.config_utils import compose_config  # noqa: E402
from ldm.data.emoji import caption as emoji_caption  # noqa: E402
from ldm.data.emoji import fully_qualified_emoji, render  # noqa: E402

STRENGTHS = (0.3, 0.6, 0.9)


def emoji_image(name: str, size: int) -> Image.Image:
    """The emoji whose caption is ``name``, rendered as the training data was (RGB on white)."""
    for e in fully_qualified_emoji():
        if emoji_caption(e) == name:
            image = render(e, size)
            if image is not None:
                return image
    raise SystemExit(f"--init {name!r} is no emoji caption: use one such as 'red apple' or 'grinning face'")


def run_sample(ckpt: Path, out: Path, prompt: str, seed: int, **extra: object) -> Image.Image:
    overrides = [f"ckpt={ckpt}", f"out_dir={out}", f"prompt={prompt}", "num_images=1", f"seed={seed}"]
    overrides += [f"{k}={v}" for k, v in extra.items()]
    records = sample.run(compose_config("sample", overrides))
    return Image.open(out / records[0]["file"]).convert("RGB")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True, type=Path)
    parser.add_argument("--init", default="red apple", help="the emoji caption rendered as the init image")
    parser.add_argument("--prompt", default="green apple")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path("docs/images/img2img.png"))
    args = parser.parse_args(argv)
    zoom, pad, label_h = 4, 4, 14
    cell = args.size * zoom + pad
    titles = ["init", *(f"strength {s}" for s in STRENGTHS), "mask", "inpainted"]
    canvas = Image.new("RGB", (len(titles) * cell, label_h + len(args.seeds) * cell), "white")
    draw = ImageDraw.Draw(canvas)
    for i, title in enumerate(titles):
        draw.text((i * cell + 2, 1), title, fill="black")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        init, mask = tmp / "init.png", tmp / "mask.png"
        emoji_image(args.init, args.size).save(init)
        repaint = Image.new("L", (args.size, args.size), 0)
        ImageDraw.Draw(repaint).rectangle([args.size // 2, 0, args.size, args.size], fill=255)  # right half
        repaint.save(mask)
        for row, seed in enumerate(args.seeds):
            tiles = [Image.open(init).convert("RGB")]
            for k, strength in enumerate(STRENGTHS):
                tiles.append(
                    run_sample(
                        args.ckpt, tmp / f"s{seed}_{k}", args.prompt, seed, init_image=init, strength=strength
                    )
                )
            tiles.append(
                repaint.point(lambda v: 160 if v else 0).convert("RGB")
            )  # shown grey: white is the page
            tiles.append(
                run_sample(
                    args.ckpt, tmp / f"m{seed}", args.prompt, seed, init_image=init, mask=mask, strength=1.0
                )
            )
            for i, tile in enumerate(tiles):
                big = tile.resize((args.size * zoom, args.size * zoom), Image.NEAREST)
                canvas.paste(big, (i * cell, label_h + row * cell))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(args.out)
    print(f"wrote {args.out}: init '{args.init}', prompt '{args.prompt}', seeds {args.seeds}")


if __name__ == "__main__":
    main()
