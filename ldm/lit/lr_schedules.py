"""Learning-rate schedules as plain functions of an optimizer (configured with ``_partial_: true``)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def warmup_constant(optimizer: Optimizer, warmup_steps: int = 0) -> LambdaLR:
    """Linear warm-up over ``warmup_steps`` then a constant learning rate."""
    return LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / max(1, warmup_steps)))


def warmup_cosine(
    optimizer: Optimizer, total_steps: int, warmup_steps: int = 0, final_ratio: float = 0.1
) -> LambdaLR:
    """Linear warm-up, then cosine decay to ``final_ratio`` of the base rate at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return final_ratio + (1.0 - final_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)


def optimizers_config(
    params: Iterable[nn.Parameter],
    optimizer: Callable[..., Optimizer],
    lr_schedule: Callable[[Optimizer], Any] | None,
) -> Any:
    """What ``configure_optimizers`` returns: the optimizer, and its schedule stepped every optimizer step."""
    opt = optimizer(params)
    if lr_schedule is None:
        return opt
    return {"optimizer": opt, "lr_scheduler": {"scheduler": lr_schedule(opt), "interval": "step"}}
