"""Training throughput with precomputed latents (and text embeddings) versus encoding every batch on the fly.

Same LatentDiffusion module, same batch, same process. The autoencoder is a randomly initialised diffusers
AutoencoderKL with Stable Diffusion's VAE config (block_out_channels 128/256/512/512, 4 latent channels, f=8),
saved to a temporary directory and loaded through ``autoencoder=diffusers`` like a real one; images are
256x256, latents 32x32x4. The UNet is ``net=unet_sd`` with ``--model-channels`` (SD uses 320: 860 M
parameters, too big for AdamW on this CPU; 128 gives 138 M) and MiniLM's 384-d context. One step =
conditioning + loss forward + backward + AdamW step; the steps of the three variants are interleaved and the
median is reported. Data loading is not timed (all variants read in-memory tensors), which if anything
understates the gain of precomputing.

    python bench/encode_vs_live.py [--batch 2] [--steps 3] [--model-channels 128]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import tempfile
import time
from pathlib import Path

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
SD_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 256,
    "scaling_factor": 0.18215,
}


def save_random_sd_vae(directory: Path) -> None:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(**SD_VAE).save_pretrained(str(directory))


def train_step(module: LatentDiffusion, optimizer: torch.optim.Optimizer, batch: dict, step: int) -> float:
    """What LatentDiffusion.training_step does, plus the optimiser step; returns seconds."""
    start = time.perf_counter()
    z = module.latents(batch)  # (B, 4, 32, 32): from the batch, or AE.encode(batch["image"])
    g = module.step_generator(z.device, step, stream=0)
    cond = module.conditioning(batch, generator=g)  # stored embeddings, or the live text encoder
    loss = module.loss_fn(module.net, z, generator=g, **cond)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument(
        "--steps", type=int, default=3, help="timed steps per variant (after one warm-up step)"
    )
    parser.add_argument("--model-channels", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=256)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        save_random_sd_vae(Path(tmp) / "sd_vae")
        cfg = compose_config(
            "train",
            [
                "net=unet_sd",
                f"net.model_channels={args.model_channels}",
                "net.context_dim=384",
                "net.gradient_checkpointing=false",
                "autoencoder=diffusers",
                f"autoencoder.pretrained={tmp}/sd_vae",
                f"image_size={args.image_size}",
            ],
        )
        module: LatentDiffusion = instantiate(cfg.model)
    module.train()
    optimizer = torch.optim.AdamW(module.trainable_parameters(), lr=1e-4)
    torch.manual_seed(0)
    captions = [CAPTIONS[i % len(CAPTIONS)] for i in range(args.batch)]
    images = torch.rand(args.batch, 3, args.image_size, args.image_size) * 2 - 1  # (B, 3, H, W) in [-1, 1]
    with torch.no_grad():
        latent = module.autoencoder.encode(images).half().float()  # as stored in latent shards (fp16)
        live = module.conditioner(captions)
    n_real = int(live["context_mask"].sum(1).max())
    variants = {
        "live: VAE encode + text encoder": {"image": images, "txt": captions},
        "precomputed latents": {"latent": latent, "txt": captions},
        "precomputed latents + embeddings": {
            "latent": latent,
            "txt": captions,
            "context": live["context"][:, :n_real].half().float(),
            "context_mask": live["context_mask"][:, :n_real],
        },
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    for step in range(args.steps + 1):  # interleaved, so drifting machine load hits every variant alike
        for name, batch in variants.items():
            seconds = train_step(module, optimizer, batch, step)
            if step > 0:  # step 0 warms up
                times[name].append(seconds)
    unet = sum(p.numel() for p in module.net.parameters()) / 1e6
    vae = sum(p.numel() for p in module.autoencoder.parameters()) / 1e6
    print(
        f"\ntraining step, UNet unet_sd with model_channels={args.model_channels} ({unet:.0f} M params), "
        f"SD-config VAE ({vae:.1f} M params, random), {args.image_size}^2 images -> "
        f"{tuple(latent.shape[1:])} latents, batch {args.batch}, median of {args.steps} steps, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    print(f"| {'variant':<34} | {'s/step':>7} | {'samples/s':>9} | {'ratio':>6} |")
    print(f"|{'-' * 36}|{'-' * 9}|{'-' * 11}|{'-' * 8}|")
    reference = statistics.median(times["live: VAE encode + text encoder"])
    for name, ts in times.items():
        s = statistics.median(ts)
        print(f"| {name:<34} | {s:>7.2f} | {args.batch / s:>9.3f} | {reference / s:>5.2f}x |")
    print(f"peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
