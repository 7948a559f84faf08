"""Weights under FSDP (torch ``FullyShardedDataParallel`` with ``use_orig_params=True``, Lightning's default).

Between steps every rank holds a flat shard of each parameter: ``named_parameters()`` of the wrapped net gives
1-d views of this rank's slice (size 0 where it holds none). ``local_state`` reads those slices,
``load_local`` writes into them, so an EMA can be kept shard by shard with no communication. Full tensors
exist only inside ``FSDP.summon_full_params`` (a collective: every rank must enter it): ``gather_full`` turns
per-rank shards of some state (the EMA) into the full state dict, ``shard_full`` the reverse (resuming from a
checkpoint's full EMA). Names are the unwrapped net's state-dict keys (FSDP's ``_fsdp_wrapped_module.``
prefixes removed).

``FSDPStrategy``: Lightning's, which also runs on the CPU over gloo (tests, debugging a sharded run without a
GPU), and saves a correct optimizer state there (see ``FSDPStrategy.optimizer_state``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import lightning as L
import torch
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.strategies import FSDPStrategy as LightningFSDPStrategy
from torch import Tensor, nn
from torch.optim import Optimizer

WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


class FSDPStrategy(LightningFSDPStrategy):
    """Lightning's FSDP strategy, on a GPU unchanged; on the CPU (gloo) it wraps the model itself with
    ``device_id=cpu``, which torch's FSDP needs said explicitly (Lightning passes none there, and refuses its
    own FSDPStrategy on the CPU: "The strategy `fsdp` requires a GPU accelerator").

        python train.py trainer=fsdp trainer.accelerator=cpu trainer.devices=2 trainer.precision=32-true
    """

    def _setup_model(self, model: nn.Module) -> nn.Module:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        if self.root_device.type == "cpu" and not any(isinstance(m, FSDP) for m in model.modules()):
            model = FSDP(
                model,
                cpu_offload=self.cpu_offload,
                mixed_precision=self.mixed_precision_config,
                sharding_strategy=self.sharding_strategy,
                device_id=torch.device("cpu"),
                **self.kwargs,
            )
            self.kwargs.pop("auto_wrap_policy", None)  # applied: Lightning would warn that it is ignored
        return super()._setup_model(model)

    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Tensor]:
        """(collective) the full optimizer state, keyed by parameter id, on rank 0 (as Lightning's).

        On the CPU it is gathered with ``offload_to_cpu=False``: torch's FSDP all-gathers every state tensor
        (``exp_avg``, then ``exp_avg_sq``) into one reused buffer and, when offloading, keeps ``buffer.cpu()``
        views of it, a copy only from an accelerator; on the CPU every state of a parameter then aliases the
        last one gathered, so Lightning's checkpoint held AdamW's exp_avg_sq in place of exp_avg and a resumed
        run took a different step (~1e-2 off). Without offloading, torch clones each state
        (``torch.distributed.fsdp._optim_utils._allgather_orig_param_states``, torch 2.14).
        """
        if self.root_device.type != "cpu" or self._state_dict_type != "full":
            return super().optimizer_state(optimizer)
        from torch.distributed.fsdp import (
            FullOptimStateDictConfig,
            FullStateDictConfig,
            OptimStateKeyType,
            StateDictType,
        )
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        if isinstance(optimizer, LightningOptimizer):
            optimizer = optimizer._optimizer
        with FSDP.state_dict_type(
            self.model,
            StateDictType.FULL_STATE_DICT,
            FullStateDictConfig(offload_to_cpu=True, rank0_only=True),
            FullOptimStateDictConfig(offload_to_cpu=False, rank0_only=True),
        ):
            state = FSDP.optim_state_dict(self.model, optimizer)
            if self.global_rank == 0:
                state = FSDP.rekey_optim_state_dict(state, OptimStateKeyType.PARAM_ID, self.model)
        return state


def clean_name(name: str) -> str:
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def fsdp_root(trainer: L.Trainer | None) -> nn.Module | None:
    """The FSDP-wrapped root module when the trainer shards parameters with FSDP, else None."""
    if trainer is None or not isinstance(trainer.strategy, LightningFSDPStrategy):
        return None
    return trainer.strategy.model


def check_orig_params(net: nn.Module) -> None:
    if any("_flat_param" in name for name, _ in net.named_parameters()):
        raise ValueError(
            "EMA under FSDP needs the original parameters: set trainer.strategy.use_orig_params=true "
            "(Lightning's default)"
        )


def persistent_buffers(net: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """The buffers ``state_dict`` holds (FSDP does not shard buffers: each rank has them whole)."""
    for prefix, module in net.named_modules():
        for name, buf in module.named_buffers(recurse=False):
            if buf is not None and name not in module._non_persistent_buffers_set:
                yield (f"{prefix}.{name}" if prefix else name), buf


def local_state(net: nn.Module) -> dict[str, Tensor]:
    """This rank's slices of the trainable parameters (1-d views under FSDP), and the buffers; not copies."""
    state = {clean_name(n): p for n, p in net.named_parameters() if p.requires_grad}
    state.update((clean_name(n), b) for n, b in persistent_buffers(net))
    return state


@torch.no_grad()
def load_local(net: nn.Module, values: dict[str, Tensor]) -> None:
    """Copies ``values`` (keys of ``local_state``, same shapes) into the net's local slices and buffers."""
    for name, tensor in local_state(net).items():
        tensor.copy_(values[name])


@contextmanager
def local_swapped(net: nn.Module, values: dict[str, Tensor]) -> Iterator[None]:
    """``values`` in the net's local slices for the duration (no communication); the net's own restored
    after."""
    backup = {k: v.detach().clone() for k, v in local_state(net).items()}
    load_local(net, values)
    try:
        yield
    finally:
        load_local(net, backup)


@torch.no_grad()
def gather_full(root: nn.Module, net: nn.Module, shards: dict[str, Tensor]) -> dict[str, Tensor]:
    """(collective) the full tensors, on the CPU, of per-rank ``shards`` of ``net``'s local state."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    with local_swapped(net, shards), FSDP.summon_full_params(root, writeback=False):
        return {k: v.detach().cpu().clone() for k, v in local_state(net).items()}


@torch.no_grad()
def shard_full(root: nn.Module, net: nn.Module, full: dict[str, Tensor]) -> dict[str, Tensor]:
    """(collective) this rank's slices of a full state of ``net`` (every rank passes the same ``full``)."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    backup = {k: v.detach().clone() for k, v in local_state(net).items()}
    missing = set(backup) - set(full)
    if missing:
        raise KeyError(
            f"the full state lacks {sorted(missing)[:3]}...: resume with the same net and model.lora"
        )
    with FSDP.summon_full_params(root, writeback=True):
        for name, tensor in local_state(net).items():
            tensor.copy_(full[name])
    shards = {k: v.detach().clone() for k, v in local_state(net).items()}
    load_local(net, backup)
    return shards


@contextmanager
def full_params(trainer: L.Trainer | None) -> Iterator[None]:
    """(collective under FSDP) every parameter whole inside, for calling sub-modules directly (sampling);
    nothing to do without FSDP."""
    root = fsdp_root(trainer)
    if root is None:
        yield
        return
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    with FSDP.summon_full_params(root, writeback=False):
        yield
