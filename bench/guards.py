"""What the trust guards cost per training step of the default model (issue 8): the non-finite checks on the
loss, the gradients and the weights before the EMA blend, and the finite check of a checkpoint before it is
written.

Same UNet, batch and process; the variants are interleaved (A B A B ...) so drift hits both alike.

    python bench/guards.py [--batch 64] [--steps 20] [--rounds 3]
"""

from __future__ import annotations

import argparse
import io
import time

import torch
from hydra.utils import instantiate

from ldm.config_utils import compose_config
from ldm.lit.guards import all_finite, checkpoint_tensors, first_nonfinite
from ldm.lit.latent_diffusion import LatentDiffusion


def run(module: LatentDiffusion, batch: dict, steps: int, guarded: bool, shadow: dict) -> float:
    optimizer = torch.optim.AdamW(module.trainable_parameters(), lr=1e-4)
    net = module.net
    for i in range(steps + 2):
        if i == 2:
            start = time.perf_counter()
        g = module.step_generator(torch.device("cpu"), i, stream=0)
        loss = module.loss_fn(
            net, batch["latent"], generator=g, context=batch["context"], context_mask=batch["context_mask"]
        )
        optimizer.zero_grad(set_to_none=True)
        if guarded:
            float(loss.detach())  # NonFiniteGuard.on_before_backward
        loss.backward()
        if guarded:  # NonFiniteGuard.on_before_optimizer_step
            assert all_finite([p.grad for p in net.parameters() if p.grad is not None])
        optimizer.step()
        with torch.no_grad():
            state = net.state_dict()
            if guarded:  # EMA: the weights are checked before they are blended
                assert first_nonfinite(state.items()) is None
            for k, v in state.items():
                shadow[k].lerp_(v, 0.001) if v.is_floating_point() else shadow[k].copy_(v)
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    module: LatentDiffusion = instantiate(compose_config("train", []).model)
    batch = {
        "latent": torch.randn(args.batch, 4, 8, 8),
        "context": torch.randn(args.batch, 12, 384),
        "context_mask": torch.ones(args.batch, 12, dtype=torch.bool),
    }
    shadow = {k: v.detach().clone() for k, v in module.net.state_dict().items()}
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(args.rounds):
        for guarded in (False, True):
            times[guarded].append(run(module, batch, args.steps, guarded, shadow))
    plain, guarded = min(times[False]), min(times[True])
    grads = [torch.randn_like(p) for p in module.net.parameters()]
    state = module.net.state_dict()
    work = []
    for _ in range(50):  # the guards' own work per step, timed alone (robust to other load on the machine)
        start = time.perf_counter()
        all_finite(grads)
        first_nonfinite(state.items())
        work.append(time.perf_counter() - start)
    work_ms = sorted(work)[len(work) // 2] * 1e3
    ckpt = {"state_dict": module.net.state_dict(), "ema_state_dict": shadow}
    start = time.perf_counter()
    assert first_nonfinite(checkpoint_tensors(ckpt)) is None
    check = time.perf_counter() - start
    start = time.perf_counter()
    torch.save(ckpt, io.BytesIO())
    save = time.perf_counter() - start
    params = sum(p.numel() for p in module.net.parameters()) / 1e6
    print(
        f"\ndefault training step ({params:.2f} M params, batch {args.batch}), best of {args.rounds} rounds "
        f"of {args.steps} steps, {torch.get_num_threads()} threads"
    )
    print("| variant | ms/step | ratio |\n|---|---|---|")
    print(f"| step + EMA | {plain * 1e3:.1f} | 1.000 |")
    print(f"| step + EMA + guards (loss, gradients, weights) | {guarded * 1e3:.1f} | {guarded / plain:.3f} |")
    print(
        f"| guards' own work alone (median of 50) | {work_ms:.2f} | {work_ms / (plain * 1e3):.3f} of a step |"
    )
    print(
        f"\ncheckpoint finite check {check * 1e3:.1f} ms vs torch.save to memory {save * 1e3:.1f} ms "
        f"({check / save:.2f}x)"
    )


if __name__ == "__main__":
    main()
