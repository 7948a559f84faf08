"""(run by tests/test_fsdp.py) a tiny net trained with AdamW, a step LR schedule and the EMA callback, on one
process or under FSDP on 2 CPU processes (gloo); writes the checkpoint's EMA, the EMA swapped into the
gathered net (what the sample grid sees), the final weights, the optimizer and LR-schedule states and the step
to ``OUT/result_{mode}[_resumed].pt``.

The batch of step s is batch s mod 4 of a fixed set, on every rank: a resumed run sees what an uninterrupted
one does (Lightning restarts a plain DataLoader at its first batch after a resume, and a resume at the end of
an epoch runs one batch of the old epoch), so the two can be compared value for value.

    python tests/fsdp_probe.py OUT single|fsdp [--resume CKPT] [--steps 4]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import lightning as L
import torch
from torch import nn

from ldm.lit.ema import EMA
from ldm.lit.sharded import FSDPStrategy, full_params


class Tiny(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Conv2d(4, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.SiLU(), nn.Conv2d(8, 4, 1)
        )
        self.net[1].register_buffer("counter", torch.zeros(3))  # a buffer (not sharded by FSDP)
        self.frozen = nn.Linear(4, 4)  # outside the net: not averaged
        self.frozen.requires_grad_(False)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        x = BATCHES[self.global_step % len(BATCHES)]  # (2, 4, 4, 4): chosen by the step, not the loader
        return (self.net(x) - x.flip(1)).square().mean()

    def configure_optimizers(self) -> dict:
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-2)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1.0 + step))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


BATCHES = torch.randn(4, 2, 4, 4, 4, generator=torch.Generator().manual_seed(1))


class Probe(L.Callback):
    """At the end: the EMA swapped in and every weight gathered, as ``SampleGrid.sample`` does; rank 0 keeps
    it."""

    def __init__(self) -> None:
        self.seen: dict[str, torch.Tensor] = {}

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        ema = next(c for c in trainer.callbacks if isinstance(c, EMA))
        with ema.swapped_in(pl_module), full_params(trainer):
            if trainer.is_global_zero:
                self.seen = {k: v.detach().clone() for k, v in pl_module.net.state_dict().items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("mode", choices=["single", "fsdp"])
    parser.add_argument("--resume")
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = torch.utils.data.DataLoader(list(BATCHES.flatten(0, 1)), batch_size=2)  # only paces the steps
    strategy = FSDPStrategy(process_group_backend="gloo") if args.mode == "fsdp" else "auto"
    probe = Probe()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2 if args.mode == "fsdp" else 1,
        strategy=strategy,
        max_steps=args.steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        callbacks=[EMA(decay=0.9), probe],
    )
    module = Tiny()
    trainer.fit(module, data, ckpt_path=args.resume)
    out = Path(args.out)
    ckpt = out / f"{args.mode}{'_resumed' if args.resume else ''}.ckpt"
    trainer.save_checkpoint(ckpt)  # a collective under FSDP: every rank
    if trainer.is_global_zero:
        saved = torch.load(ckpt, weights_only=False)
        keep = ("optimizer_states", "lr_schedulers", "global_step", "ema_num_updates")
        torch.save(
            {
                "ema": saved["ema_state_dict"],
                "seen": probe.seen,
                "weights": saved["state_dict"],
                **{key: saved[key] for key in keep},
            },
            out / f"result_{args.mode}{'_resumed' if args.resume else ''}.pt",
        )


if __name__ == "__main__":
    main()
