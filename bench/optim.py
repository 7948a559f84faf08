"""AdamW implementations on the same net and gradients: torch's for-loop (CPU default), foreach, fused.

Interleaved and repeated in one process; prints the optimizer-step time (median, min, max), the ratio to the
for-loop and whether the weights after all steps are bitwise equal to the for-loop's.

    python bench/optim.py [--net unet_small] [--repeats 5] [--steps 4]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from hydra.utils import instantiate

from ldm.config_utils import compose_config

VARIANTS = {"for-loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--net", default="unet_small")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    net = instantiate(compose_config("train", [f"net={args.net}"]).net)
    nets = {k: copy.deepcopy(net) for k in VARIANTS}
    opts = {
        k: torch.optim.AdamW(nets[k].parameters(), lr=1e-3, weight_decay=0.01, **v)
        for k, v in VARIANTS.items()
    }
    g = torch.Generator().manual_seed(0)
    grads = [[torch.randn(p.shape, generator=g) for p in net.parameters()] for _ in range(3)]
    times: dict[str, list[float]] = {k: [] for k in VARIANTS}
    for _ in range(args.repeats):
        for name, opt in opts.items():
            start = time.perf_counter()
            for i in range(args.steps):
                for p, grad in zip(nets[name].parameters(), grads[i % 3], strict=True):
                    p.grad = grad
                opt.step()
            times[name].append((time.perf_counter() - start) / args.steps)
    params = sum(p.numel() for p in net.parameters()) / 1e6
    print(
        f"\nAdamW step, net={args.net} ({params:.2f} M params), {torch.get_num_threads()} threads, "
        f"{args.repeats} repeats x {args.steps} steps, torch {torch.__version__}"
    )
    print(
        f"| {'AdamW':<9} | {'median ms':>9} | {'min ms':>7} | {'max ms':>7} | {'for-loop/this':>13} | "
        f"{'bitwise':>7} |"
    )
    print(f"|{'-' * 11}|{'-' * 11}|{'-' * 9}|{'-' * 9}|{'-' * 15}|{'-' * 9}|")
    loop = list(nets["for-loop"].parameters())
    for name, ts in times.items():
        ratios = [a / b for a, b in zip(times["for-loop"], ts, strict=True)]
        same = all(torch.equal(a, b) for a, b in zip(loop, nets[name].parameters(), strict=True))
        print(
            f"| {name:<9} | {statistics.median(ts) * 1e3:>9.1f} | {min(ts) * 1e3:>7.1f} | "
            f"{max(ts) * 1e3:>7.1f} | {statistics.median(ratios):>12.2f}x | {str(same):>7} |"
        )


if __name__ == "__main__":
    main()
