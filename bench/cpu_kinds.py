"""The default training step on this CPU's native ISA vs an emulated AVX2-only CPU, at 1 and 2 threads.

The users' slow box is an AVX2-only EPYC. The vector ISA cannot change inside a process (ATen, oneDNN and MKL
pick their kernels at start-up), so each (ISA, threads) setting is a long-lived child process; the parent asks
each child in turn to time a block of steps (interleaved: only one child runs at a time, every repeat visits
all of them), and reports each setting's time against the reference (native ISA, 2 threads) of the same
repeat: median and min-max of the per-repeat ratios. Emulated AVX2 sets, in the child's environment,
``ATEN_CPU_CAPABILITY=avx2``, ``ONEDNN_MAX_CPU_ISA=AVX2`` and ``MKL_ENABLE_INSTRUCTIONS=AVX2``; the child
reports ``torch.backends.cpu.get_cpu_capability()`` so the table shows that it took.

The step is the default run's: the default config's model (48-ch UNet, v-prediction min-SNR loss), batch 64,
8x8x4 latents, precomputed 32x384 MiniLM context as the latent shards carry it, fused AdamW, the EMA blend.

``--profile``: afterwards each child runs ``torch.profiler`` over a few steps; the top ops by self CPU time
per setting, and the same ops grouped (conv, GroupNorm, attention, linear, elementwise, optimizer/EMA, other).

    python bench/cpu_kinds.py [--repeats 5] [--steps 5] [--profile] [--threads 1,2] [--isas native,avx2]
        [--extra avx2:2:OMP_WAIT_POLICY=PASSIVE]   # more settings: isa:threads[:VAR=value,...]
        [--extra native:1:BENCH_CHANNELS_LAST=1]   # the net and latents in channels_last
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections import defaultdict

AVX2_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
GROUPS = (  # (group, substrings of the op name); first match wins
    ("optimizer+EMA", ("adam", "lerp", "foreach")),
    ("conv", ("conv", "mkldnn")),
    ("GroupNorm", ("group_norm",)),
    (
        "attention",
        ("scaled_dot_product", "_flash_attention", "softmax", "bmm", "baddbmm", "_efficient_attention"),
    ),
    ("linear/matmul", ("addmm", "aten::mm", "matmul", "linear")),
    (
        "elementwise",
        (
            "add",
            "mul",
            "silu",
            "sub",
            "div",
            "copy_",
            "fill_",
            "sum",
            "mean",
            "pow",
            "cat",
            "where",
            "exp",
            "sqrt",
            "neg",
            "clamp",
            "sin",
            "cos",
            "zero_",
            "to",
            "_to_copy",
            "masked",
        ),
    ),
)
Setting = tuple[str, int, str]  # (isa, threads, extra environment "VAR=value,...")
REF: Setting = ("native", 2, "")


def label(s: Setting) -> str:
    return f"{s[0]} {s[1]}t" + (f" {s[2]}" if s[2] else "")


def parse_setting(spec: str) -> Setting:
    isa, threads, *extra = spec.split(":", 2)
    return (isa, int(threads), extra[0] if extra else "")


def group_of(name: str) -> str:
    low = name.lower()
    for group, keys in GROUPS:
        if any(k in low for k in keys):
            return group
    return "other"


# ---------------------------------------------------------------- child: one (ISA, threads) setting
def child(threads: int, batch: int, channels_last: bool) -> None:
    import torch
    from hydra.utils import instantiate

    from ldm.config_utils import compose_config
    from ldm.lit.ema import averaged_state, blend

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    channels_last = channels_last or os.environ.get("BENCH_CHANNELS_LAST") == "1"  # per setting: --extra
    cfg = compose_config("train", [])
    module = instantiate(cfg.model)
    net = module.net
    if channels_last:
        net.to(memory_format=torch.channels_last)
    optimizer = instantiate(cfg.optim)(module.trainable_parameters())
    captions = [f"caption {i}" for i in range(batch)]
    latent = torch.randn(batch, 4, 8, 8)
    if channels_last:
        latent = latent.contiguous(memory_format=torch.channels_last)
    batch_d = {
        "latent": latent,
        "txt": captions,
        "context": torch.randn(batch, 32, 384).half().float(),
        "context_mask": torch.ones(batch, 32, dtype=torch.bool),
    }
    shadow = {k: v.detach().clone() for k, v in averaged_state(net).items()}
    counter = [0]

    def step() -> None:
        g = module.step_generator(torch.device("cpu"), counter[0], stream=0)
        counter[0] += 1
        cond = module.conditioning(batch_d, generator=g)
        loss = module.loss_fn(net, batch_d["latent"], generator=g, **cond)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        blend(shadow, averaged_state(net), 0.05)

    for _ in range(2):
        step()
    hello = {"capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads()}
    print(json.dumps(hello), flush=True)
    for line in sys.stdin:
        cmd, arg = line.split()
        if cmd == "time":
            start = time.perf_counter()
            for _ in range(int(arg)):
                step()
            print(json.dumps({"seconds": (time.perf_counter() - start) / int(arg)}), flush=True)
        elif cmd == "profile":
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(int(arg)):
                    step()
            ops = {e.key: (e.self_cpu_time_total / int(arg), e.count / int(arg)) for e in prof.key_averages()}
            print(json.dumps({"ops": ops}), flush=True)
        else:
            return


# ---------------------------------------------------------------- parent
class Child:
    def __init__(self, setting: Setting, args: argparse.Namespace) -> None:
        isa, threads, extra = setting
        env = dict(os.environ)
        for k in AVX2_ENV:
            env.pop(k, None)
        if isa == "avx2":
            env.update(AVX2_ENV)
        env["OMP_NUM_THREADS"] = str(threads)
        env["KINETO_LOG_LEVEL"] = "5"  # the profiler's start/stop lines
        env.update(dict(kv.split("=", 1) for kv in extra.split(",") if kv))
        cmd = [sys.executable, __file__, "--child", str(threads), "--batch", str(args.batch)]
        if args.channels_last:
            cmd.append("--channels-last")
        self.proc = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.hello = self.read()

    def read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"child exited with {self.proc.wait()}")
        return json.loads(line)

    def ask(self, cmd: str) -> dict:
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return self.read()

    def close(self) -> None:
        self.proc.stdin.write("quit 0\n")
        self.proc.stdin.close()
        self.proc.wait()


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def table(head: list[str], rows: list[list[str]]) -> None:
    """A Markdown table, columns as wide as their widest cell, the first left-aligned."""
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    for row in [head, ["-" * w for w in widths], *rows]:
        cells = [
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        print("| " + " | ".join(cells) + " |")


def profile_tables(children: dict[Setting, Child], steps: int, top: int) -> None:
    profiles = {key: c.ask(f"profile {steps}")["ops"] for key, c in children.items()}
    keys = list(profiles)
    ref = REF if REF in profiles else keys[0]
    avx2 = ("avx2", ref[1], "")

    def ms(k: Setting, op: str) -> float:
        return profiles[k].get(op, (0.0, 0.0))[0] / 1e3

    shown: list[str] = []
    for k in keys:  # each setting's own top ops
        shown += [op for op in sorted(profiles[k], key=lambda op, k=k: -ms(k, op))[:top] if op not in shown]
    shown.sort(key=lambda op: -max(ms(k, op) for k in keys))
    print(f"\ntop ops by self CPU time, ms per step (torch.profiler over {steps} steps; calls per step)")
    rows = []
    for op in shown[: top + 5]:
        ratio = f"{ms(avx2, op) / ms(ref, op):.2f}x" if avx2 in profiles and ms(ref, op) else "-"
        rows.append(
            [op[:44], f"{profiles[ref].get(op, (0, 0))[1]:.0f}", *(f"{ms(k, op):.1f}" for k in keys), ratio]
        )
    table(["op", "calls", *map(label, keys), f"avx2/native at {ref[1]}t"], rows)
    print("\nby group: ms per step (share of the setting's profiled self time)")
    grouped = {k: defaultdict(float) for k in keys}
    for k in keys:
        for op in profiles[k]:
            grouped[k][group_of(op)] += ms(k, op)
    rows = []
    for g in [g for g, _ in GROUPS] + ["other"]:
        cells = [f"{grouped[k][g]:.1f} ({100 * grouped[k][g] / sum(grouped[k].values()):.1f}%)" for k in keys]
        ratio = f"{grouped[avx2][g] / grouped[ref][g]:.2f}x" if avx2 in profiles and grouped[ref][g] else "-"
        rows.append([g, *cells, ratio])
    rows.append(
        [
            "total",
            *(f"{sum(grouped[k].values()):.1f}" for k in keys),
            f"{sum(grouped[avx2].values()) / sum(grouped[ref].values()):.2f}x" if avx2 in profiles else "-",
        ]
    )
    table(["group", *map(label, keys), f"avx2/native at {ref[1]}t"], rows)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5, help="steps per timed block")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--isas", default="native,avx2")
    parser.add_argument(
        "--extra", action="append", default=[], help="another setting: isa:threads[:VAR=v,...]"
    )
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--profile-steps", type=int, default=5)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--channels-last", action="store_true", help="the net and latents in channels_last")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.batch, args.channels_last)
    settings = [(isa, int(t), "") for isa in args.isas.split(",") for t in args.threads.split(",")]
    settings += [parse_setting(spec) for spec in args.extra]
    children = {s: Child(s, args) for s in settings}
    try:
        for s, c in children.items():
            print(
                f"{label(s)}: torch.backends.cpu.get_cpu_capability() = {c.hello['capability']}, "
                f"{c.hello['threads']} threads"
            )
        times: dict[Setting, list[float]] = defaultdict(list)
        for _ in range(args.repeats):
            for s, c in children.items():
                times[s].append(c.ask(f"time {args.steps}")["seconds"])
        ref = REF if REF in times else settings[0]
        flags = open("/proc/cpuinfo").read().count("avx512f")
        print(
            f"\ndefault training step (batch {args.batch}, 8x8x4 latents, 32x384 context, fused AdamW + EMA"
            f"{', channels_last' if args.channels_last else ''}), {args.repeats} interleaved repeats of "
            f"{args.steps} steps; CPUs with avx512f: {flags} of {os.cpu_count()}, load average "
            f"{os.getloadavg()[0]:.1f}"
        )
        rows = []
        for s, ts in times.items():
            ratios = [a / b for a, b in zip(ts, times[ref], strict=True)]
            rows.append(
                [
                    label(s),
                    spread([x * 1e3 for x in ts]),
                    f"{1 / statistics.median(ts):.2f}",
                    spread(ratios) + "x",
                ]
            )
        table(["setting", "ms/step median (min-max)", "steps/s", f"time / {label(ref)} (min-max)"], rows)
        if args.profile:
            profile_tables(children, args.profile_steps, args.top)
    finally:
        for c in children.values():
            c.close()
    return None


if __name__ == "__main__":
    main()
