"""Which sampler, how many steps? Distance of each sampler to a 1,000-step reference from the same noise, and
time.

For a trained checkpoint: every sampler (for its schedule's coordinates) runs at 10/20/50 steps on each
spacing, from the same initial noise, prompts and guidance as a 1,000-step deterministic reference (DDIM on
every training timestep, i.e. the probability-flow ODE solved finely; flow Euler for rectified-flow models).
Prints RMS distance in decoded pixels (0..1 scale) and in latents, and seconds per image; writes a picture
(rows: samplers at the smallest step count, then the reference) next to the table.

    python bench/sampler_chooser.py [--ckpt latest] [--steps 10 20 50] [--num-images 8]
        [--out bench/sampler_chooser.png]

Stochastic samplers (ddpm, euler_ancestral, dpmpp_2m_sde) sample the same distribution but not the ODE's path,
so their distance to the reference does not shrink to 0; it is shown for completeness and marked "SDE".
"""

from __future__ import annotations

import argparse
import functools
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from ldm.generate import generate, make_grid, to_pil
from ldm.lit.loading import load_for_sampling, resolve_checkpoint
from ldm.sampling.grids import sampling_sigmas
from ldm.sampling.registry import SAMPLERS, samplers_for

PROMPTS = [
    "red apple",
    "grinning face",
    "blue heart",
    "green apple",
    "yellow heart",
    "fire",
    "sun",
    "dog face",
]


def run_sampler(
    model, sampler, sigmas, prompts, seeds, cfg_scale, repeats: int = 1
) -> tuple[torch.Tensor, torch.Tensor, float, int]:
    """(latents, images, seconds per image (best of ``repeats``), network calls) for one sampler on one
    grid."""
    captured: dict[str, torch.Tensor] = {}
    calls = [0]

    def decode(z: torch.Tensor) -> torch.Tensor:
        captured["z"] = z
        return model.decode_samples(z)

    def count(*_: object) -> None:
        calls[0] += 1

    hook = model.denoiser.net.register_forward_hook(count)  # CFG: one (doubled-batch) call per evaluation
    best = float("inf")
    for _ in range(repeats):
        calls[0] = 0
        start = time.perf_counter()
        images = generate(
            model.denoiser,
            model.conditioner,
            decode,
            prompts,
            sampler=sampler,
            sigmas=sigmas,
            latent_shape=model.latent_shape,
            seeds=seeds,
            cfg_scale=cfg_scale,
        )
        best = min(best, (time.perf_counter() - start) / len(prompts))
    hook.remove()
    return captured["z"], images, best, calls[0]


def rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).pow(2).mean().sqrt())


def labelled_row(images: torch.Tensor, label: str) -> Image.Image:
    grid = make_grid(to_pil(images), ncols=len(images))
    canvas = Image.new("RGB", (grid.width + 150, grid.height), (255, 255, 255))
    canvas.paste(grid, (150, 0))
    ImageDraw.Draw(canvas).text((4, grid.height // 2 - 6), label, fill=(0, 0, 0))
    return canvas


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ckpt", default="latest")
    parser.add_argument("--log-dir", default="logs")
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 20, 50])
    parser.add_argument("--spacings", nargs="+", default=["leading", "trailing", "karras"])
    parser.add_argument("--repeats", type=int, default=2, help="timing: best of this many runs")
    parser.add_argument("--num-images", type=int, default=8)
    parser.add_argument("--cfg-scale", type=float, default=5.0)
    parser.add_argument("--reference-steps", type=int, default=1000)
    parser.add_argument("--out", default="bench/sampler_chooser.png")
    args = parser.parse_args()

    ckpt = resolve_checkpoint(args.ckpt, args.log_dir)
    model = load_for_sampling(ckpt, use_ema=True, device=torch.device("cpu"))
    schedule = model.denoiser.schedule
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.num_images)]
    seeds = list(range(args.num_images))
    flow = schedule.space == "flow"
    samplers = samplers_for(schedule.space)  # every registered sampler for this model's coordinates
    spacings = ["flow"] if flow else args.spacings
    ref_sampler = SAMPLERS["flow_euler" if flow else "ddim"].fn
    ref_sigmas = sampling_sigmas(schedule, args.reference_steps, None if flow else "linspace")
    ref_z, ref_images, ref_time, _ = run_sampler(
        model, ref_sampler, ref_sigmas, prompts, seeds, args.cfg_scale
    )

    print(f"checkpoint: {ckpt}  schedule: {schedule!r}  prediction: {model.denoiser.prediction}")
    print(
        f"reference: {ref_sampler.__name__}, {args.reference_steps} steps, {ref_time:.3f} s/image; "
        f"{args.num_images} images, cfg {args.cfg_scale}, torch threads {torch.get_num_threads()}"
    )
    print(
        "cells: RMS distance to the reference in decoded pixels (0..1) / in latents, network calls, s/image"
    )
    header = f"{'sampler':<23}{'spacing':<9}" + "".join(
        f"{f'{n} steps: px / latent':>24}{'NFE':>5}{'s/img':>7}" for n in args.steps
    )
    print(header + "\n" + "-" * len(header))
    rows = []
    for name, spec in samplers.items():
        for spacing in spacings:
            cells, first_images = [], None
            for n in args.steps:
                sampler = functools.partial(spec.fn)
                sigmas = sampling_sigmas(schedule, n, spacing)
                z, images, secs, nfe = run_sampler(
                    model, sampler, sigmas, prompts, seeds, args.cfg_scale, args.repeats
                )
                first_images = images if first_images is None else first_images
                cells.append(f"{rms(images, ref_images):>15.4f} / {rms(z, ref_z):<6.4f}{nfe:>5d}{secs:>7.3f}")
            tag = " (SDE)" if spec.stochastic else ""
            print(f"{name + tag:<23}{spacing:<9}" + "".join(cells))
            rows.append(labelled_row(first_images, f"{name} {spacing} {args.steps[0]}"))
    rows.append(labelled_row(ref_images, f"reference {args.reference_steps}"))
    picture = Image.new("RGB", (rows[0].width, sum(r.height for r in rows)), (255, 255, 255))
    for i, row in enumerate(rows):
        picture.paste(row, (0, i * rows[0].height))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    picture.save(args.out)
    print(f"picture: {args.out}")


if __name__ == "__main__":
    main()
