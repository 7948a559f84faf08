"""EMA share of the training step: the EMA callback's update (state_dict, finite check, fused lerp) against a
training step (forward + backward + AdamW) of the same net, interleaved and repeated in one process.

Also times the per-tensor lerp loop the fused ``torch._foreach_lerp_`` replaced, and the parts of the update.

    python bench/ema.py [--net unet_small] [--batch 64] [--repeats 5] [--steps 5]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from hydra.utils import instantiate

from ldm.config_utils import compose_config
from ldm.lit.ema import EMA, blend
from ldm.lit.guards import first_nonfinite


def per_tensor(shadow: dict, state: dict, weight: float) -> None:
    for name, value in state.items():
        ema = shadow[name]
        if value.dtype.is_floating_point:
            ema.lerp_(value.detach().to(ema.dtype), weight)
        else:
            ema.copy_(value)


def seconds(fn: Callable[[], object], n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--net", default="unet_small")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    cfg = compose_config("train", [f"net={args.net}"])
    net = instantiate(cfg.net)
    holder = torch.nn.Module()
    holder.net = net
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)
    x = torch.randn(args.batch, net.in_channels, 8, 8)
    t = torch.rand(args.batch) * 999
    ctx = torch.randn(args.batch, 12, 384)

    def train_step() -> None:
        loss = net(x, t, ctx).square().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    ema = EMA(decay=0.999)
    ema.shadow = {k: v.detach().clone() for k, v in net.state_dict().items()}
    trainer = type("T", (), {"global_step": 0, "accumulate_grad_batches": 1})()
    state = net.state_dict()
    parts: dict[str, Callable[[], object]] = {
        "training step": train_step,
        "EMA callback update": lambda: ema.on_train_batch_end(trainer, holder, None, None, 0),
        "  state_dict()": net.state_dict,
        "  finite check": lambda: first_nonfinite(state.items()),
        "  foreach lerp": lambda: blend(ema.shadow, state, 1e-3),
        "  per-tensor lerp (old)": lambda: per_tensor(ema.shadow, state, 1e-3),
    }
    train_step()  # warm-up
    times: dict[str, list[float]] = {k: [] for k in parts}
    for _ in range(args.repeats):  # interleaved
        for name, fn in parts.items():
            n = args.steps if name == "training step" else 20 * args.steps
            times[name].append(seconds(fn, n))
    step = statistics.median(times["training step"])
    params = sum(p.numel() for p in net.parameters()) / 1e6
    print(
        f"\nEMA vs training step: net={args.net} ({params:.2f} M params, {len(state)} tensors), batch "
        f"{args.batch}, 8x8 latents, {torch.get_num_threads()} threads, {args.repeats} repeats, torch "
        f"{torch.__version__}"
    )
    print(f"| {'part':<26} | {'median ms':>9} | {'min ms':>8} | {'max ms':>8} | {'% of step':>9} |")
    print(f"|{'-' * 28}|{'-' * 11}|{'-' * 10}|{'-' * 10}|{'-' * 11}|")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(
            f"| {name:<26} | {med * 1e3:>9.2f} | {min(ts) * 1e3:>8.2f} | {max(ts) * 1e3:>8.2f} | "
            f"{100 * med / step:>8.2f}% |"
        )
    share = statistics.median(times["EMA callback update"]) / (
        step + statistics.median(times["EMA callback update"])
    )
    ratio = [o / f for o, f in zip(times["  per-tensor lerp (old)"], times["  foreach lerp"], strict=True)]
    print(f"\nEMA share of a step with EMA: {100 * share:.2f}% (goal <= 3%)")
    print(
        f"per-tensor / foreach lerp time: median {statistics.median(ratio):.2f}x "
        f"(min {min(ratio):.2f}, max {max(ratio):.2f})"
    )


if __name__ == "__main__":
    main()
