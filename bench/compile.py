"""model.compile on this machine: eager vs torch.compile of the whole backbone vs per block (regional).

Same weights and batch; prints the first step (compilation included), then steady-state training steps
(forward + backward + fused AdamW) interleaved over repeats: median/min/max ms and the speed-up over eager.

    python bench/compile.py [--net unet_small] [--batch 64] [--size 8] [--repeats 5] [--steps 3]
    python bench/compile.py --backend aot_eager --net unet_tiny --batch 4   # tracing only, a quick check
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from hydra.utils import instantiate

from ldm.config_utils import compose_config
from ldm.nets.compile import compile_backbone


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--net", default="unet_small")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=8, help="latent side")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--modes", default="none,full,regional")
    args = parser.parse_args()
    torch.manual_seed(0)
    eager = instantiate(compose_config("train", [f"net={args.net}"]).net)
    x = torch.randn(args.batch, eager.in_channels, args.size, args.size)
    t = torch.rand(args.batch) * 999
    ctx = torch.randn(args.batch, args.tokens, eager.context_dim)
    nets, opts, first = {}, {}, {}
    for mode in args.modes.split(","):
        net = compile_backbone(copy.deepcopy(eager), mode, backend=args.backend)
        nets[mode] = net
        opts[mode] = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=True)

    def step(mode: str) -> None:
        loss = nets[mode](x, t, ctx).square().mean()
        opts[mode].zero_grad(set_to_none=True)
        loss.backward()
        opts[mode].step()

    for mode in nets:
        start = time.perf_counter()
        step(mode)
        first[mode] = time.perf_counter() - start
    times: dict[str, list[float]] = {mode: [] for mode in nets}
    for _ in range(args.repeats):
        for mode in nets:
            start = time.perf_counter()
            for _ in range(args.steps):
                step(mode)
            times[mode].append((time.perf_counter() - start) / args.steps)
    params = sum(p.numel() for p in eager.parameters()) / 1e6
    print(
        f"\ntraining step, net={args.net} ({params:.2f} M params), batch {args.batch}, "
        f"{args.size}x{args.size} latents, backend {args.backend}, {torch.get_num_threads()} threads, torch "
        f"{torch.__version__}"
    )
    print(
        f"| {'compile':<9} | {'first step s':>12} | {'median ms':>9} | {'min ms':>8} | {'max ms':>8} | "
        f"{'speed-up (min-med-max)':>22} |"
    )
    print(f"|{'-' * 11}|{'-' * 14}|{'-' * 11}|{'-' * 10}|{'-' * 10}|{'-' * 24}|")
    base = times[next(iter(times))]
    for mode, ts in times.items():
        r = sorted(b / m for b, m in zip(base, ts, strict=True))
        spread = f"{r[0]:.2f}-{statistics.median(r):.2f}-{r[-1]:.2f}x"
        print(
            f"| {mode:<9} | {first[mode]:>12.1f} | {statistics.median(ts) * 1e3:>9.1f} | "
            f"{min(ts) * 1e3:>8.1f} | {max(ts) * 1e3:>8.1f} | {spread:>22} |"
        )
    print(
        f"\nspeed-up: the first row's time over each row's, per interleaved repeat ({args.repeats} repeats)"
    )


if __name__ == "__main__":
    main()
