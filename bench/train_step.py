"""Training-step throughput of the default emoji model: precomputed text embeddings vs the live MiniLM
encoder.

Same UNet, same batch, same process; prints a table with steps/s, samples/s and the ratio, plus peak memory.

    python bench/train_step.py [--batch 64] [--steps 20] [--net unet_small]
"""

from __future__ import annotations

import argparse
import resource
import time

import torch
from hydra.utils import instantiate

from ldm.config_utils import compose_config
from ldm.lit.latent_diffusion import LatentDiffusion

CAPTIONS = [
    "woman detective: medium-dark skin tone",
    "red apple",
    "family: man, woman, girl, boy",
    "blue heart",
]


def timed_steps(module: LatentDiffusion, batch: dict, steps: int) -> float:
    optimizer = torch.optim.AdamW(module.trainable_parameters(), lr=1e-4)
    for i in range(steps + 2):
        if i == 2:  # two warm-up steps
            start = time.perf_counter()
        g = module.step_generator(torch.device("cpu"), i, stream=0)
        cond = module.conditioning(batch, generator=g)
        loss = module.loss_fn(module.net, batch["latent"], generator=g, **cond)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--net", default="unet_small")
    args = parser.parse_args()
    cfg = compose_config("train", [f"net={args.net}"])
    module: LatentDiffusion = instantiate(cfg.model)
    captions = [CAPTIONS[i % len(CAPTIONS)] for i in range(args.batch)]
    latent = torch.randn(args.batch, 4, 8, 8)
    with torch.no_grad():
        live = module.conditioner(captions)
    n_real = int(live["context_mask"].sum(1).max())
    precomputed = {
        "latent": latent,
        "txt": captions,
        "context": live["context"][:, :n_real].half().float(),
        "context_mask": live["context_mask"][:, :n_real],
    }
    rows = []
    for name, batch in (
        ("live MiniLM encoder", {"latent": latent, "txt": captions}),
        ("precomputed embeddings", precomputed),
    ):
        seconds = timed_steps(module, batch, args.steps)
        rows.append((name, 1.0 / seconds, args.batch / seconds))
    params = sum(p.numel() for p in module.net.parameters()) / 1e6
    print(
        f"\ntraining step, net={args.net} ({params:.2f} M params), batch {args.batch}, 8x8x4 latents, "
        f"{torch.get_num_threads()} threads, {torch.__version__}"
    )
    print(f"| {'conditioning':<24} | {'steps/s':>8} | {'samples/s':>9} |")
    print(f"|{'-' * 26}|{'-' * 10}|{'-' * 11}|")
    for name, sps, samples in rows:
        print(f"| {name:<24} | {sps:>8.2f} | {samples:>9.1f} |")
    print(f"\nratio precomputed / live: {rows[1][1] / rows[0][1]:.2f}x")
    print(f"peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
