"""Non-finite guards: a diverged run stops (or skips the step) instead of training on, and never saves NaN.

``NonFiniteGuard`` checks the loss before backward and the gradients before each optimizer step. By default it
halts the run on every rank with a message naming the step; ``action=skip`` drops the step's gradients instead
(the optimizer leaves parameters without a gradient untouched) and counts it, halting after
``max_consecutive_skips``. The checkpoint writer and the EMA refuse non-finite weights whatever the guard's
setting (``first_nonfinite``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

import lightning as L
import torch
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import Tensor

from ldm.cli import UserError

log = logging.getLogger(__name__)

ACTIONS = ("halt", "skip", "off")


class NonFiniteError(UserError):
    """The loss, a gradient or a weight is NaN or infinite: the run diverged."""


def first_nonfinite(tensors: Iterable[tuple[str, Any]]) -> tuple[str, int, int] | None:
    """(name, non-finite count, numel) of the first floating tensor holding a NaN or inf, else None.

    One fused reduction decides the common all-finite case (one device sync); only then is each tensor
    scanned.
    """
    floats = [(n, v) for n, v in tensors if isinstance(v, Tensor) and v.is_floating_point() and v.numel()]
    if all_finite([v for _, v in floats]):
        return None
    for name, value in floats:
        finite = torch.isfinite(value.detach())
        if not bool(finite.all()):
            return name, int((~finite).sum()), value.numel()
    return None


def checkpoint_tensors(checkpoint: Mapping[str, Any]) -> Iterable[tuple[str, Any]]:
    """The weights of a checkpoint that must be finite: the state dict and the EMA copy (optimizer moments
    aside)."""
    for key in ("state_dict", "ema_state_dict"):
        for name, value in (checkpoint.get(key) or {}).items():
            yield f"{key}.{name}", value


def all_finite(tensors: list[Tensor]) -> bool:
    """Whether every element is finite: one fused norm per device decides the usual case (one sync per
    device); a non-finite norm is confirmed element-wise, since finite values above ~1.8e19 overflow the norm
    itself."""
    if not tensors:
        return True
    norms = torch._foreach_norm([t.detach().float() for t in tensors])
    by_device: dict[torch.device, list[Tensor]] = {}
    for norm in norms:
        by_device.setdefault(norm.device, []).append(norm)
    if all(bool(torch.isfinite(torch.stack(group)).all()) for group in by_device.values()):
        return True
    return all(bool(torch.isfinite(t.detach()).all()) for t in tensors)


class NonFiniteGuard(L.Callback):
    """Stops a diverged run at the first non-finite loss or gradient (see the module docstring)."""

    def __init__(self, action: str = "halt", max_consecutive_skips: int = 20) -> None:
        if action not in ACTIONS:
            raise ValueError(f"callbacks.nonfinite.action={action!r}: choose one of {', '.join(ACTIONS)}")
        self.action = action
        self.max_consecutive_skips = max_consecutive_skips
        self.loss_value: float = 0.0
        self.skipped = 0
        self.consecutive = 0

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: Tensor) -> None:
        self.loss_value = float(
            loss.detach()
        )  # a micro-batch's NaN stays NaN in the accumulated gradient too

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self.action == "off":
            return
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        # with a GradScaler (fp16) inf gradients are expected: the scaler skips those steps itself
        plugin = trainer.precision_plugin
        scaled = isinstance(plugin, MixedPrecision) and plugin.scaler is not None
        loss_ok = bool(torch.isfinite(torch.tensor(self.loss_value)))
        bad = not loss_ok or (not scaled and not all_finite(grads))
        if (
            trainer.world_size > 1 and torch.distributed.is_initialized()
        ):  # every rank takes the same decision
            flag = torch.tensor([float(bad)], device=pl_module.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            bad = bool(flag.item())
        if not bad:
            self.consecutive = 0
            return
        what = f"loss {self.loss_value}" if not loss_ok else "gradient (loss finite on this rank)"
        where = f"step {trainer.global_step} (epoch {trainer.current_epoch})"
        if self.action == "halt" or self.consecutive >= self.max_consecutive_skips:
            extra = f" after {self.consecutive} skipped steps in a row" if self.consecutive else ""
            raise NonFiniteError(
                f"non-finite {what} at {where}{extra}: the run diverged and was stopped before this step; "
                f"resume "
                "from the last checkpoint with a lower optim.lr (or callbacks.nonfinite.action=skip to skip "
                "such steps)"
            )
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = None  # optimizers leave parameters without a gradient untouched
        self.skipped += 1
        self.consecutive += 1
        log.warning("non-finite %s at %s: step skipped (%d so far)", what, where, self.skipped)
        pl_module.log("train/nonfinite_skipped", float(self.skipped), rank_zero_only=False)

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped, "consecutive": self.consecutive}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped = int(state_dict.get("skipped", 0))
        self.consecutive = int(state_dict.get("consecutive", 0))
