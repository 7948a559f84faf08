"""Exponential moving average of the denoiser's weights, as a Lightning callback.

The EMA weights travel in the checkpoint under ``ema_state_dict`` (keys of ``denoiser.net``) and are restored on
resume; ``sample.py`` loads them by default. Decay warms up as min(decay, (1 + n) / (10 + n)) so that short runs
are not dominated by the random initialisation.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import lightning as L
import torch
from lightning.pytorch.strategies import FSDPStrategy
from torch import Tensor, nn

from ldm.lit.guards import NonFiniteError, first_nonfinite

EMA_KEY = "ema_state_dict"


def averaged_state(net: nn.Module) -> dict[str, Tensor]:
    """The net's state without its frozen parameters: they never change (a LoRA's base), so they are not averaged
    and not stored twice; for a fully trained net this is the whole state dict."""
    frozen = {name for name, p in net.named_parameters() if not p.requires_grad}
    return {k: v for k, v in net.state_dict().items() if k not in frozen}


@torch.no_grad()
def blend(shadow: dict[str, Tensor], state: dict[str, Tensor], weight: float) -> None:
    """shadow <- shadow + weight * (state - shadow) for floating tensors, one fused ``torch._foreach_lerp_`` per
    (device, dtype) group; other tensors (step counters) are copied. Bit-identical to ``shadow[k].lerp_(...)`` per
    tensor: the foreach kernel computes the same lerp (on CPU it loops over that very op)."""
    groups: dict[tuple[torch.device, torch.dtype], tuple[list[Tensor], list[Tensor]]] = {}
    for name, value in state.items():
        ema = shadow[name]
        if value.dtype.is_floating_point:
            emas, values = groups.setdefault((ema.device, ema.dtype), ([], []))
            emas.append(ema)
            values.append(value.detach().to(ema.dtype))
        else:
            ema.copy_(value)
    for emas, values in groups.values():
        torch._foreach_lerp_(emas, values, weight)  # ema <- decay*ema + (1-decay)*value


class EMA(L.Callback):
    def __init__(self, decay: float = 0.999, update_every: int = 1) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}: set callbacks.ema.decay=0.999")
        self.decay = decay
        self.update_every = update_every
        self.num_updates = 0
        self.shadow: dict[str, Tensor] = {}

    @staticmethod
    def target(pl_module: L.LightningModule) -> nn.Module:
        return pl_module.net

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if isinstance(trainer.strategy, FSDPStrategy):
            raise ValueError(
                "the EMA callback does not gather FSDP-sharded weights yet: add callbacks.ema=null callbacks.sample_grid=null, or use trainer=ddp"
            )
        net = self.target(pl_module)
        if not self.shadow:
            self.shadow = {k: v.detach().clone() for k, v in averaged_state(net).items()}
        self.shadow = {k: v.to(pl_module.device) for k, v in self.shadow.items()}

    @torch.no_grad()
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if (batch_idx + 1) % trainer.accumulate_grad_batches:
            return  # not an optimizer step yet (gradient accumulation)
        if trainer.global_step % self.update_every:
            return
        state = averaged_state(self.target(pl_module))
        bad = first_nonfinite(state.items())
        if bad is not None:  # never blend a diverged step into the average
            raise NonFiniteError(
                f"weight {bad[0]} has {bad[1]} of {bad[2]} values NaN/inf after step {trainer.global_step}: the EMA "
                "was not updated and the run stops; resume from the last checkpoint with a lower optim.lr"
            )
        self.num_updates += 1
        decay = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        blend(self.shadow, state, 1.0 - decay)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        checkpoint[EMA_KEY] = {k: v.detach().cpu().clone() for k, v in self.shadow.items()}
        checkpoint["ema_num_updates"] = self.num_updates

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        if EMA_KEY not in checkpoint:
            raise KeyError("checkpoint has no EMA weights: resume without callbacks.ema or from an EMA run")
        self.shadow = {k: v.clone() for k, v in checkpoint[EMA_KEY].items()}
        self.num_updates = int(checkpoint.get("ema_num_updates", 0))

    @contextmanager
    def swapped_in(self, pl_module: L.LightningModule) -> Iterator[None]:
        """Temporarily load the EMA weights into the network (for sampling during training)."""
        net = self.target(pl_module)
        backup = {k: v.detach().clone() for k, v in averaged_state(net).items()}
        if set(self.shadow) != set(backup):
            raise KeyError(
                "the EMA weights do not match the net's trained tensors: resume with the same model.lora"
            )
        net.load_state_dict(self.shadow, strict=False)  # the frozen base tensors stay as they are
        try:
            yield
        finally:
            net.load_state_dict(backup, strict=False)
