"""Loader settings that depend on the machine: the DataLoader worker count, and float16 batches from
workers."""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from torch.utils.data._utils.collate import default_convert

log = logging.getLogger(__name__)

MAX_AUTO_WORKERS = 4
FLOAT_KEYS = ("latent", "context", "image")  # the batch's float tensors that a worker may send as float16


def usable_cpus() -> int:
    """The cores this process may run on (its affinity), as PyTorch's worker-count warning counts them."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def resolve_num_workers(requested: int | str, local_world_size: int = 1, cpus: int | None = None) -> int:
    """DataLoader workers for one rank. ``auto``: the cores of this rank's share of the machine less one for
    the training process (Lightning's ``suggested_max_num_workers``, but 0 rather than 1 on a single core), at
    most ``MAX_AUTO_WORKERS``: 1 on a 2-core box, 4 from 10 cores. A count above the usable cores is lowered
    to them."""
    cpus = usable_cpus() if cpus is None else cpus
    if requested == "auto":
        return min(MAX_AUTO_WORKERS, max(0, cpus // max(1, local_world_size) - 1))
    if isinstance(requested, str) or int(requested) < 0:
        raise ValueError(f"data.num_workers must be a count >= 0 or auto, got '{requested}'")
    if int(requested) > cpus:
        log.info("data.num_workers=%d lowered to %d, the cores this process may use", requested, cpus)
        return cpus
    return int(requested)


def check_transfer_settings(pin_memory: bool | str, worker_dtype: str) -> tuple[bool | str, str]:
    """``data.pin_memory`` (true, false, auto) and ``data.worker_dtype`` (float32, float16), checked."""
    if worker_dtype not in ("float32", "float16"):
        raise ValueError(f"data.worker_dtype must be float32 or float16, got '{worker_dtype}'")
    if pin_memory not in (True, False, "auto"):
        raise ValueError(f"data.pin_memory must be true, false or auto, got '{pin_memory}'")
    return pin_memory, worker_dtype


def to_float16(batch: Any) -> Any:
    """(in a worker) the batch's float32 tensors of ``FLOAT_KEYS`` as float16: half the bytes to the main
    process."""
    batch = default_convert(batch)
    if isinstance(batch, dict):
        for key in FLOAT_KEYS:
            if isinstance(batch.get(key), torch.Tensor) and batch[key].dtype == torch.float32:
                batch[key] = batch[key].half()
    return batch


def to_float32(batch: Any) -> Any:
    """(in the main process, after the device copy) the float16 tensors of ``FLOAT_KEYS`` back to float32:
    undoes ``to_float16``."""
    if isinstance(batch, dict):
        for key in FLOAT_KEYS:
            if isinstance(batch.get(key), torch.Tensor) and batch[key].dtype == torch.float16:
                batch[key] = batch[key].float()
    return batch


def resolve_pin_memory(setting: bool | str, device_type: str | None) -> bool:
    """``data.pin_memory``: ``auto`` pins only on an accelerator (``device_type`` not "cpu"; None without a
    trainer), where it makes the host-to-device copy asynchronous; on the CPU it is a no-op."""
    if setting != "auto":
        return bool(setting)
    return device_type is not None and device_type != "cpu"
