"""Exponential moving average of the denoiser's weights, as a Lightning callback.

The EMA weights travel in the checkpoint under ``ema_state_dict`` (keys of ``denoiser.net``) and are restored
on resume; ``sample.py`` loads them by default. Decay warms up as min(decay, (1 + n) / (10 + n)) so that short
runs are not dominated by the random initialisation.

Under FSDP the EMA is sharded alongside the weights: each rank averages its own slices of the parameters (no
communication per step); the full EMA is gathered (a collective) only for checkpoints and sample grids, and a
resumed run's full EMA is sliced again (``ldm.lit.sharded``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from ldm.lit.guards import NonFiniteError, first_nonfinite
from ldm.lit.sharded import check_orig_params, fsdp_root, gather_full, local_state, local_swapped, shard_full

EMA_KEY = "ema_state_dict"


def averaged_state(net: nn.Module) -> dict[str, Tensor]:
    """The net's state without its frozen parameters: they never change (a LoRA's base), so they are not
    averaged and not stored twice; for a fully trained net this is the whole state dict."""
    frozen = {name for name, p in net.named_parameters() if not p.requires_grad}
    return {k: v for k, v in net.state_dict().items() if k not in frozen}


@torch.no_grad()
def blend(shadow: dict[str, Tensor], state: dict[str, Tensor], weight: float) -> None:
    """shadow <- shadow + weight * (state - shadow) for floating tensors, one fused ``torch._foreach_lerp_``
    per (device, dtype) group; other tensors (step counters) are copied. Bit-identical to
    ``shadow[k].lerp_(...)`` per tensor: the foreach kernel computes the same lerp (on CPU it loops over that
    very op)."""
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
        self.root: nn.Module | None = None  # the FSDP-wrapped module (None: not sharded)
        self.sharded = False  # the shadow holds this rank's FSDP slices (else whole tensors)

    @staticmethod
    def target(pl_module: L.LightningModule) -> nn.Module:
        return pl_module.net

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        net = self.target(pl_module)
        self.root = fsdp_root(trainer)
        if self.root is not None:
            check_orig_params(net)
            if not self.shadow:
                self.shadow = {k: v.detach().clone() for k, v in local_state(net).items()}
                self.sharded = True
            self._shard(pl_module)
            return
        if not self.shadow:
            self.shadow = {k: v.detach().clone() for k, v in averaged_state(net).items()}
        self.shadow = {k: v.to(pl_module.device) for k, v in self.shadow.items()}

    def _shard(self, pl_module: L.LightningModule) -> None:
        """(collective) a full EMA (from a checkpoint) -> this rank's slices of it, under FSDP."""
        if self.root is not None and not self.sharded:
            full = {k: v.to(pl_module.device) for k, v in self.shadow.items()}
            self.shadow = shard_full(self.root, self.target(pl_module), full)
            self.sharded = True

    def state(self, pl_module: L.LightningModule) -> dict[str, Tensor]:
        """The tensors averaged this step: the net's (this rank's slices under FSDP)."""
        net = self.target(pl_module)
        return local_state(net) if self.root is not None else averaged_state(net)

    def full_shadow(self, pl_module: L.LightningModule) -> dict[str, Tensor]:
        """The whole EMA on the CPU (keys of the net's state dict); a collective under FSDP."""
        if self.sharded:
            return gather_full(self.root, self.target(pl_module), self.shadow)
        return {k: v.detach().cpu().clone() for k, v in self.shadow.items()}

    @torch.no_grad()
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if (batch_idx + 1) % trainer.accumulate_grad_batches:
            return  # not an optimizer step yet (gradient accumulation)
        if trainer.global_step % self.update_every:
            return
        state = self.state(pl_module)
        bad = first_nonfinite(state.items())
        if self.root is not None:  # every rank stops, or none: a rank checks only its own slices
            if trainer.strategy.reduce_boolean_decision(bad is not None, all=False) and bad is None:
                raise NonFiniteError(
                    f"another rank's weight slices have NaN/inf values after step {trainer.global_step}: the "
                    f"EMA "
                    "was not updated and the run stops; resume from the last checkpoint with a lower optim.lr"
                )
        if bad is not None:  # never blend a diverged step into the average
            raise NonFiniteError(
                f"weight {bad[0]} has {bad[1]} of {bad[2]} values NaN/inf after step {trainer.global_step}: "
                f"the EMA "
                "was not updated and the run stops; resume from the last checkpoint with a lower optim.lr"
            )
        self.num_updates += 1
        decay = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        blend(self.shadow, state, 1.0 - decay)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        checkpoint[EMA_KEY] = self.full_shadow(pl_module)
        checkpoint["ema_num_updates"] = self.num_updates

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        if EMA_KEY not in checkpoint:
            raise KeyError("checkpoint has no EMA weights: resume without callbacks.ema or from an EMA run")
        self.shadow = {k: v.clone() for k, v in checkpoint[EMA_KEY].items()}
        self.sharded = False
        self.num_updates = int(checkpoint.get("ema_num_updates", 0))
        self._shard(pl_module)  # under FSDP Lightning restores after on_fit_start

    @contextmanager
    def swapped_in(self, pl_module: L.LightningModule) -> Iterator[None]:
        """Temporarily load the EMA weights into the network (for sampling during training). Under FSDP they
        go into this rank's slices (every rank must enter): sample inside ``ldm.lit.sharded.full_params``."""
        net = self.target(pl_module)
        if self.sharded:
            with local_swapped(net, self.shadow):
                yield
            return
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
