"""GPU training benchmark: the SD-1.x UNet (ours and diffusers' UNet2DConditionModel, same weights) at 256²
and 512² images (32x32 and 64x64 latents), bf16 autocast, with and without torch.compile and gradient
checkpointing, each at the largest batch that fits: samples/s, peak memory and MFU.

MFU = model FLOPs per sample (forward + backward, counted by torch.utils.flop_counter on the eager net without
checkpointing, so recomputation is not credited) x samples/s / the GPU's dense bf16 peak (PEAK_BF16 by device
name). A step is forward + MSE loss + backward + fused AdamW (fp32 master weights), as in training.

    python bench/gpu.py                # everything, a few minutes on one H100/H200; writes bench_gpu.json
    python bench/gpu.py --latents 64 --impls ours --compile on --ckpt off
    python bench/gpu.py --smoke        # CPU, tiny UNet, fixed batch, no MFU: checks the script end to end
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from torch.utils.flop_counter import FlopCounterMode

from ldm.config_utils import compose_config
from ldm.convert.diffusers_unet import unet_to_diffusers
from ldm.nets.unet import UNet

SD15 = ["net=unet_sd", "net.gradient_checkpointing=false"]  # configs/net/unet_sd.yaml: the SD 1.x UNet
SMOKE = dict(
    model_channels=16,
    channel_mult=(1, 2),
    num_res_blocks=1,
    attention_resolutions=(2,),
    num_heads=2,
    context_dim=32,
    norm_groups=8,
)
# dense bf16 tensor-core peak, FLOP/s (vendor datasheets; sparsity excluded), matched by substring of the name
PEAK_BF16 = {
    "H200": 989e12,
    "H100 SXM": 989e12,
    "H100 NVL": 835e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,
    "GH200": 989e12,
    "B200": 2250e12,
    "A100": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
    "A10G": 70e12,
    "RTX 4090": 165e12,
    "RTX 3090": 71e12,
}


def peak_flops(device: torch.device) -> tuple[str, float | None]:
    if device.type != "cuda":
        return "cpu", None
    name = torch.cuda.get_device_name(device)
    return name, next((v for k, v in PEAK_BF16.items() if k in name), None)


def build(impl: str, base: UNet, ckpt: bool, compiled: bool, device: torch.device) -> torch.nn.Module:
    """A fresh copy (own optimizer state) of the same weights, as ours or as diffusers' model."""
    if impl == "ours":
        net = UNet(**{**base_kwargs(base), "gradient_checkpointing": ckpt})
        net.load_state_dict(base.state_dict())
    else:
        net = unet_to_diffusers(base)
        if ckpt:
            net.enable_gradient_checkpointing()
    net = net.to(device).train()
    if compiled:
        net.compile(dynamic=False)
    return net


def base_kwargs(net: UNet) -> dict[str, Any]:
    keys = (
        "model_channels",
        "channel_mult",
        "num_res_blocks",
        "attention_resolutions",
        "num_heads",
        "context_dim",
        "norm_groups",
    )
    return {k: getattr(net, k) for k in keys}


def call(
    impl: str, net: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor
) -> torch.Tensor:
    return net(x, t, ctx) if impl == "ours" else net(x, t, ctx).sample


def make_step(
    impl: str, net: torch.nn.Module, batch: int, side: int, tokens: int, device: torch.device, bf16: bool
):
    opt = torch.optim.AdamW(net.parameters(), lr=1e-5, fused=True)
    x = torch.randn(batch, 4, side, side, device=device)
    t = torch.randint(0, 1000, (batch,), device=device).float()
    ctx = torch.randn(
        batch, tokens, net.config.cross_attention_dim if impl != "ours" else net.context_dim, device=device
    )
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()

    def step() -> None:
        with autocast:
            loss = (call(impl, net, x, t, ctx).float() - x).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step, (x, t, ctx)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fits(impl: str, base: UNet, ckpt: bool, batch: int, side: int, tokens: int, device: torch.device) -> bool:
    net = step = None
    try:
        net = build(impl, base, ckpt, False, device)
        step, _ = make_step(impl, net, batch, side, tokens, device, bf16=device.type == "cuda")
        step()
        sync(device)
        return True
    except torch.OutOfMemoryError:
        return False
    finally:
        net = step = None  # noqa: F841
        if device.type == "cuda":
            torch.cuda.empty_cache()


def largest_batch(
    impl: str, base: UNet, ckpt: bool, side: int, tokens: int, device: torch.device, cap: int
) -> int:
    """Doubling, then bisection between the last fit and the first failure (eager; compile needs no more
    memory)."""
    lo, hi = 0, 1
    while hi <= cap and fits(impl, base, ckpt, hi, side, tokens, device):
        lo, hi = hi, hi * 2
    hi = min(hi, cap + 1)
    while hi - lo > max(1, lo // 8):  # within 1/8 of the true largest
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(impl, base, ckpt, mid, side, tokens, device) else (lo, mid)
    return lo


def flops_per_sample(impl: str, base: UNet, side: int, tokens: int, device: torch.device) -> float:
    net = build(impl, base, False, False, device)
    _, (x, t, ctx) = make_step(impl, net, 2, side, tokens, device, bf16=False)
    with FlopCounterMode(display=False) as counter:
        call(impl, net, x, t, ctx).square().mean().backward()
    return counter.get_total_flops() / 2


def measure(
    impl: str,
    base: UNet,
    ckpt: bool,
    compiled: bool,
    batch: int,
    side: int,
    tokens: int,
    device: torch.device,
    steps: int,
) -> dict[str, float | None]:
    net = build(impl, base, ckpt, compiled, device)
    step, _ = make_step(impl, net, batch, side, tokens, device, bf16=device.type == "cuda")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(2):  # warm-up (compilation)
        step()
    sync(device)
    warmup = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    seconds = (time.perf_counter() - start) / steps
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"samples_per_s": batch / seconds, "step_s": seconds, "warmup_s": warmup, "peak_gib": peak}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="CPU, tiny UNet, batch 2, 8x8 latents, no MFU")
    p.add_argument("--latents", default=None, help="latent sides, comma-separated (default 32,64; smoke 8)")
    p.add_argument("--impls", default="ours,diffusers")
    p.add_argument("--compile", default=None, help="off,on (default; smoke: off)")
    p.add_argument("--ckpt", default="off,on", help="gradient checkpointing: off,on")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 10; smoke 1)")
    p.add_argument("--max-batch", type=int, default=512)
    p.add_argument("--tokens", type=int, default=77)
    p.add_argument("--out", default="bench_gpu.json")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32, as train.py sets it on a GPU
    sides = [int(s) for s in (args.latents or ("8" if args.smoke else "32,64")).split(",")]
    compiles = [c == "on" for c in (args.compile or ("off" if args.smoke else "off,on")).split(",")]
    ckpts = [c == "on" for c in args.ckpt.split(",")]
    steps = args.steps or (1 if args.smoke else 10)
    tokens = 8 if args.smoke else args.tokens
    torch.manual_seed(0)
    base = UNet(**SMOKE) if args.smoke else instantiate(compose_config("train", SD15).net)
    name, peak = peak_flops(device)
    params = sum(p.numel() for p in base.parameters()) / 1e6
    rows: list[dict[str, Any]] = []
    for side in sides:
        for impl in args.impls.split(","):
            flops = flops_per_sample(impl, base, side, tokens, device)
            for ckpt in ckpts:
                batch = (
                    2 if args.smoke else largest_batch(impl, base, ckpt, side, tokens, device, args.max_batch)
                )
                for compiled in compiles:
                    r = measure(impl, base, ckpt, compiled, batch, side, tokens, device, steps)
                    mfu = flops * r["samples_per_s"] / peak if peak else None
                    rows.append(
                        {
                            "image": side * 8,
                            "latent": side,
                            "impl": impl,
                            "compile": compiled,
                            "grad_ckpt": ckpt,
                            "batch": batch,
                            "gflop_per_sample": flops / 1e9,
                            "mfu": mfu,
                            **r,
                        }
                    )
                    print_row(rows[-1], first=len(rows) == 1, device=name, params=params)
    Path(args.out).write_text(
        json.dumps(
            {
                "device": name,
                "peak_bf16_flops": peak,
                "params_m": params,
                "torch": torch.__version__,
                "rows": rows,
            },
            indent=1,
        )
    )
    print_ratios(rows)
    print(f"\nwrote {args.out}")
    return rows


def print_ratios(rows: list[dict[str, Any]]) -> None:
    """ours / diffusers samples/s and peak memory for each setting both were run at."""
    theirs = {(r["image"], r["compile"], r["grad_ckpt"]): r for r in rows if r["impl"] == "diffusers"}
    pairs = [(r, theirs.get((r["image"], r["compile"], r["grad_ckpt"]))) for r in rows if r["impl"] == "ours"]
    for ours, ref in pairs:
        if ref is not None:
            print(
                f"ours/diffusers at {ours['image']}², compile {'on' if ours['compile'] else 'off'}, ckpt "
                f"{'on' if ours['grad_ckpt'] else 'off'}: "
                f"{ours['samples_per_s'] / ref['samples_per_s']:.2f}x samples/s, "
                f"{(ours['peak_gib'] or 0) / (ref['peak_gib'] or 1):.2f}x peak memory (batch {ours['batch']} "
                f"vs {ref['batch']})"
            )


def print_row(r: dict[str, Any], first: bool, device: str, params: float) -> None:
    if first:
        print(
            f"\nUNet {params:.1f} M params on {device}, bf16 autocast (GPU), step = fwd + bwd + fused AdamW"
        )
        print(
            "| image | impl      | compile | ckpt | batch | samples/s | peak GiB | GFLOP/sample | MFU    | "
            "warm-up s |"
        )
        print(
            "|-------|-----------|---------|------|-------|-----------|----------|--------------|--------|-----------|"
        )
    mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
    print(
        f"| {r['image']:>5} | {r['impl']:<9} | {'on' if r['compile'] else 'off':<7} | "
        f"{'on' if r['grad_ckpt'] else 'off':<4} | {r['batch']:>5} | {r['samples_per_s']:>9.2f} | "
        f"{r['peak_gib'] or float('nan'):>8.2f} | {r['gflop_per_sample']:>12.1f} | {mfu:>6} | "
        f"{r['warmup_s']:>9.1f} |",
        flush=True,
    )


if __name__ == "__main__":
    main()
