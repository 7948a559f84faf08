"""Ours vs diffusers at the same weights (ldm.convert): forward, training step and peak memory, interleaved.

Two sizes: the default emoji UNet (configs/net/unet_small.yaml, 8x8x4 latents, 32x384 context) and an
SD-1.x-shaped UNet scaled down (SD's block layout, heads and 768-d context at model_channels=64, 16x16
latents). A training step is forward + MSE + backward + AdamW + EMA: ours as ``train.py`` runs it (fused
AdamW, ``ldm.lit.ema.blend``), diffusers' as its ``train_text_to_image.py`` does by default
(``torch.optim.AdamW``, ``EMAModel``), or ``--recipe same``: ours on both, which compares the networks alone.
Peak memory: the rise of the process's peak RSS (VmHWM, reset through /proc/self/clear_refs after
``malloc_trim``) during one training step — RSS, not tracemalloc, which does not see torch's CPU allocator.
Ratios are diffusers' time / ours (> 1: ours faster) and ours' memory / diffusers', per interleaved repeat.

``--sampling``: the full text-to-image path (text encoding, 25 DDIM steps with CFG, decode) of the default
model vs ``StableDiffusionPipeline`` built from the same components by ``ldm.convert.export_pipeline``.

    python bench/vs_diffusers.py [--repeats 5] [--sizes emoji,sd_small] [--recipe script|same]
    python bench/vs_diffusers.py --sampling [--repeats 3]
    python bench/vs_diffusers.py --profile [--sizes emoji]   # where each one's training step spends its time
    OMP_NUM_THREADS=1 python bench/vs_diffusers.py --clock cpu   # on a shared machine: CPU time, 1 thread
    python bench/vs_diffusers.py --compile regional [--compile-diffusers]   # model.compile vs diffusers
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from hydra.utils import instantiate

from ldm.config_utils import compose_config
from ldm.convert.diffusers_unet import unet_to_diffusers
from ldm.lit.ema import blend
from ldm.nets.compile import COMPILE_MODES, compile_backbone

SIZES = {  # name: (net config overrides, batch, latent side, context tokens)
    "emoji": (["net=unet_small"], 64, 8, 32),
    # SD 1.x's layout, heads and 768-d context (configs/net/unet_sd.yaml) at 64 channels instead of 320
    "sd_small": (["net=unet_sd", "net.model_channels=64", "net.gradient_checkpointing=false"], 4, 16, 77),
}
PROMPTS = [
    "red apple",
    "woman detective: medium-dark skin tone",
    "blue heart",
    "family: man, woman, girl, boy",
]


def rss_peak_rise(fn: Callable[[], object]) -> float:
    """MiB by which the process's peak RSS rises above its current RSS while ``fn`` runs (Linux)."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS

    def field(name: str) -> int:
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(name))
        return int(line.split()[1])

    before = field("VmRSS:")
    fn()
    return (field("VmHWM:") - before) / 1024


def avx512() -> str:
    """The CPU kind every figure depends on (an AVX2-only CPU runs the same step ~3x slower)."""
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return "AVX-512 CPU" if " avx512f" in flags else "AVX2-only CPU (no avx512f)"


CLOCK = {"wall": time.perf_counter, "cpu": time.process_time}
clock = CLOCK["wall"]


def timed(fn: Callable[[], object], n: int) -> float:
    start = clock()
    for _ in range(n):
        fn()
    return (clock() - start) / n


def optimizer_and_ema(net: torch.nn.Module, script: bool) -> Callable[[], None]:
    """The update after backward: AdamW + EMA. Ours as ``train.py`` runs it (fused AdamW, one foreach lerp
    for the EMA); ``script``: as diffusers' ``train_text_to_image.py`` does by default (``torch.optim.AdamW``
    with its defaults, ``EMAModel`` with ``foreach=False``)."""
    if script:
        from diffusers.training_utils import EMAModel

        opt = torch.optim.AdamW(net.parameters(), lr=1e-5, weight_decay=1e-2)
        ema = EMAModel(net.parameters(), decay=0.999)

        def update() -> None:
            opt.step()
            opt.zero_grad(set_to_none=True)
            ema.step(net.parameters())

        return update
    opt = torch.optim.AdamW(net.parameters(), lr=1e-5, weight_decay=1e-2, fused=True)
    shadow = {k: v.detach().clone() for k, v in net.state_dict().items()}

    def update() -> None:
        opt.step()
        opt.zero_grad(set_to_none=True)
        blend(shadow, net.state_dict(), 1e-3)

    return update


def unet_parts(
    size: str, compile_ours: str, compile_theirs: bool, recipe: str
) -> dict[str, dict[str, Callable[[], object]]]:
    overrides, batch, side, tokens = SIZES[size]
    torch.manual_seed(0)
    ours = instantiate(compose_config("train", overrides).net)
    with torch.no_grad():
        ours.out[-1].weight.normal_(std=0.02)  # non-zero output, so that the equality check means something
    theirs = unet_to_diffusers(ours).train()
    x, t = torch.randn(batch, 4, side, side), torch.randint(0, 1000, (batch,)).float()
    ctx = torch.randn(batch, tokens, ours.context_dim)
    compile_both(ours, theirs, compile_ours, compile_theirs)
    calls = {"ours": lambda: ours(x, t, ctx), "diffusers": lambda: theirs(x, t, ctx).sample}
    with torch.no_grad():
        torch.testing.assert_close(calls["ours"](), calls["diffusers"](), rtol=1e-4, atol=1e-4)
    parts: dict[str, dict[str, Callable[[], object]]] = {}
    for name, net in (("ours", ours), ("diffusers", theirs)):
        update = optimizer_and_ema(net, script=recipe == "script" and name == "diffusers")

        def train_step(net=net, update=update, call=calls[name]) -> None:
            loss = (call() - x).square().mean()
            loss.backward()
            update()

        def forward(call=calls[name]) -> None:
            with torch.no_grad():
                call()

        parts[name] = {"forward": forward, "training step": train_step}
    return parts


def compile_both(ours: torch.nn.Module, theirs: torch.nn.Module, mode: str, theirs_too: bool) -> None:
    """``model.compile=<mode>`` on ours (``ldm.nets.compile``); diffusers' UNet compiled whole if asked."""
    compile_backbone(ours, mode)
    if theirs_too:
        theirs.compile(dynamic=False)


def sampling_parts(
    steps: int, cfg: float, compile_ours: str, compile_theirs: bool
) -> dict[str, dict[str, Callable[[], object]]]:
    from ldm.convert.export_pipeline import build_sd_pipeline
    from ldm.generate import generate, initial_noise
    from ldm.sampling import sample_ddim
    from ldm.sampling.grids import sampling_sigmas

    model = instantiate(compose_config("train", ["conditioner.mask_padding=false"]).model).eval()
    ae = model.autoencoder
    shape = (model.net.in_channels, 8, 8)
    pipe = build_sd_pipeline(model.denoiser, model.conditioner, ae, image_size=8 * ae.downsample_factor)
    pipe.set_progress_bar_config(disable=True)
    compile_both(model.net, pipe.unet, compile_ours, compile_theirs)
    seeds = list(range(len(PROMPTS)))
    sigmas = sampling_sigmas(model.denoiser.schedule, steps)

    def ours() -> torch.Tensor:
        with torch.no_grad():
            return generate(
                model.denoiser,
                model.conditioner,
                model.decode_samples,
                PROMPTS,
                sampler=functools.partial(sample_ddim),
                sigmas=sigmas,
                latent_shape=shape,
                seeds=seeds,
                cfg_scale=cfg,
            )

    def theirs() -> torch.Tensor:
        side = 8 * ae.downsample_factor
        return pipe(
            PROMPTS,
            num_inference_steps=steps,
            guidance_scale=cfg,
            height=side,
            width=side,
            output_type="pt",
            latents=initial_noise(seeds, shape, torch.device("cpu")),
        ).images

    diff = float((ours() - theirs()).abs().max())
    print(f"sampling: max |ours - pipeline| over the images = {diff:.2e}")
    return {"ours": {"text-to-image": ours}, "diffusers": {"text-to-image": theirs}}


def report(title: str, times: dict[tuple[str, str], list[float]], memory: dict[str, list[float]]) -> None:
    print(f"\n{title}")
    print(f"| {'measure':<14} | {'ours ms':>9} | {'diffusers ms':>12} | {'diffusers/ours min-med-max':>27} |")
    print(f"|{'-' * 16}|{'-' * 11}|{'-' * 14}|{'-' * 29}|")
    for what in dict.fromkeys(w for _, w in times):
        a, b = times["ours", what], times["diffusers", what]
        r = sorted(y / x for x, y in zip(a, b, strict=True))
        print(
            f"| {what:<14} | {statistics.median(a) * 1e3:>9.1f} | {statistics.median(b) * 1e3:>12.1f} | "
            f"{f'{r[0]:.2f} - {statistics.median(r):.2f} - {r[-1]:.2f}x':>27} |"
        )
    if memory:
        r = sorted(x / y for x, y in zip(memory["ours"], memory["diffusers"], strict=True))
        print(
            f"| {'peak RSS rise':<14} | {statistics.median(memory['ours']):>7.0f}MB | "
            f"{statistics.median(memory['diffusers']):>10.0f}MB | "
            f"{f'ours/diffusers {r[0]:.2f} - {statistics.median(r):.2f} - {r[-1]:.2f}x':>27} |"
        )


def profile_step(parts: dict[str, dict[str, Callable[[], object]]], steps: int, top: int) -> None:
    """Top ops by self CPU time of the training step, ours vs diffusers, with call counts (launch
    overheads)."""
    from torch.profiler import ProfilerActivity, profile

    found: dict[str, dict[str, tuple[float, float]]] = {}
    for impl, fns in parts.items():
        fns["training step"]()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                fns["training step"]()
        found[impl] = {
            e.key: (e.self_cpu_time_total / steps / 1e3, e.count / steps) for e in prof.key_averages()
        }
    ops = sorted(
        set(found["ours"]) | set(found["diffusers"]),
        key=lambda op: -max(found[i].get(op, (0, 0))[0] for i in found),
    )
    print(
        f"\ntraining step profile (torch.profiler, {steps} steps each): self CPU ms per step, calls per step"
    )
    print(f"| {'op':<44} | {'ours ms':>8} | {'calls':>6} | {'diffusers ms':>12} | {'calls':>6} |")
    print(f"|{'-' * 46}|{'-' * 10}|{'-' * 8}|{'-' * 14}|{'-' * 8}|")
    for op in ops[:top]:
        (a, na), (b, nb) = found["ours"].get(op, (0, 0)), found["diffusers"].get(op, (0, 0))
        print(f"| {op[:44]:<44} | {a:>8.1f} | {na:>6.0f} | {b:>12.1f} | {nb:>6.0f} |")
    totals = {i: (sum(v[0] for v in f.values()), sum(v[1] for v in f.values())) for i, f in found.items()}
    print(
        f"| {'all ops':<44} | {totals['ours'][0]:>8.1f} | {totals['ours'][1]:>6.0f} | "
        f"{totals['diffusers'][0]:>12.1f} | {totals['diffusers'][1]:>6.0f} |"
    )


def run(parts: dict[str, dict[str, Callable[[], object]]], repeats: int, n: int, memory: bool) -> tuple:
    for impl in parts:  # warm-up
        for fn in parts[impl].values():
            fn()
    times: dict[tuple[str, str], list[float]] = {}
    mem: dict[str, list[float]] = {}
    for _ in range(repeats):  # interleaved: ours, diffusers, ours, ...
        for impl, fns in parts.items():
            for what, fn in fns.items():
                times.setdefault((impl, what), []).append(timed(fn, n))
            if memory:
                mem.setdefault(impl, []).append(rss_peak_rise(fns["training step"]))
    return times, mem


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--n", type=int, default=2, help="calls per timing")
    parser.add_argument("--sizes", default="emoji,sd_small")
    parser.add_argument("--sampling", action="store_true")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--cfg", type=float, default=5.0)
    parser.add_argument("--profile", action="store_true", help="profile the training step instead of timing")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--compile", default="none", choices=COMPILE_MODES, help="model.compile for ours")
    parser.add_argument("--compile-diffusers", action="store_true", help="torch.compile diffusers' UNet too")
    parser.add_argument(
        "--recipe",
        default="script",
        choices=("script", "same"),
        help="diffusers' update as its training script does it (default), or the same as ours (net only)",
    )
    parser.add_argument(
        "--clock",
        default="wall",
        choices=CLOCK,
        help="cpu: this process's CPU time, far steadier than wall time on a shared machine (use 1 thread)",
    )
    args = parser.parse_args()
    global clock
    clock = CLOCK[args.clock]
    compiled = f"ours compile={args.compile}, diffusers {'compiled' if args.compile_diffusers else 'eager'}"
    machine = (
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, {args.repeats} interleaved repeats, "
        f"{avx512()}, {compiled}, {args.clock} clock, {args.recipe} update"
    )
    if args.sampling:
        times, _ = run(
            sampling_parts(args.steps, args.cfg, args.compile, args.compile_diffusers),
            args.repeats,
            1,
            memory=False,
        )
        report(
            f"text-to-image, default emoji model, {len(PROMPTS)} prompts, {args.steps} DDIM steps, CFG "
            f"{args.cfg}, ours vs StableDiffusionPipeline ({machine})",
            times,
            {},
        )
        return
    for size in args.sizes.split(","):
        parts = unet_parts(size, args.compile, args.compile_diffusers, args.recipe)
        if args.profile:
            print(f"\n{size}: {SIZES[size][1:]} (batch, latent side, tokens); {machine}")
            profile_step(parts, args.n + 2, args.top)
            continue
        _, batch, side, tokens = SIZES[size]
        times, mem = run(parts, args.repeats, args.n, memory=True)
        report(
            f"{size}: batch {batch}, {side}x{side}x4 latents, {tokens} tokens, fp32 ({machine})", times, mem
        )


if __name__ == "__main__":
    main()
