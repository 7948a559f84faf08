"""Checkpoint files written atomically (temporary file, fsync, rename, fsync of the directory), never with
non-finite weights, and read without executing pickles."""

from __future__ import annotations

import errno
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from ldm.lit.guards import NonFiniteError, checkpoint_tensors, first_nonfinite

log = logging.getLogger(__name__)

TMP_SUFFIX = ".tmp"
_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read once at import (setting it is the only way to read it)


def load_checkpoint_file(
    path: str | os.PathLike, map_location: Any = "cpu", mmap: bool = False
) -> dict[str, Any]:
    """torch.load with weights_only=True; a missing file gives a one-line error that names the fix."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint not found: '{path}' — pass ckpt=PATH to an existing .ckpt (e.g. "
            f"logs/train/runs/<run>/checkpoints/last.ckpt)"
        )
    return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)


def _os_error_in(exc: BaseException) -> OSError | None:
    """The OSError behind an exception (torch.save reports a failed write as a RuntimeError whose context it
    is)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return None


def fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (POSIX; a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on a directory; the rename itself is still atomic
    finally:
        os.close(fd)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """Write ``obj`` to ``path`` so that ``path`` is always either the old complete file or the new one.

    A failed write (disk full, file-size limit) leaves the previous file intact and raises an OSError that
    names the real cause (ENOSPC, EFBIG) and the file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp's 0600 would hide checkpoints from the rest of a shared cluster
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        cause = _os_error_in(exc)
        if cause is None or not isinstance(exc, OSError | RuntimeError):
            raise
        name = errno.errorcode.get(cause.errno or 0, "OSError")
        raise OSError(
            cause.errno,
            f"could not write checkpoint '{path}': {name} ({cause.strerror or cause}); the previous file is "
            f"intact — free space in '{path.parent}' (or raise the file-size limit) and resume with "
            f"ckpt_path=last",
        ) from exc
    fsync_dir(path.parent)


def remove_stale_temporaries(directory: Path) -> list[Path]:
    """Delete the temporary files of checkpoint writes that were killed (``.NAME.XXXX.tmp``); returns them."""
    stale = sorted(p for p in Path(directory).glob(f".*.ckpt.*{TMP_SUFFIX}") if p.is_file())
    for p in stale:
        p.unlink(missing_ok=True)
    if stale:
        log.info("removed %d temporary file(s) of interrupted checkpoint writes in %s", len(stale), directory)
    return stale


def check_finite_checkpoint(checkpoint: dict[str, Any], path: Any) -> None:
    bad = first_nonfinite(checkpoint_tensors(checkpoint))
    if bad is not None:
        name, count, total = bad
        raise NonFiniteError(
            f"refusing to write checkpoint '{path}': {name} has {count} of {total} values NaN/inf (the run "
            f"diverged); "
            "the previous checkpoints are kept — resume from one with a lower optim.lr"
        )


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning CheckpointIO: atomic writes of finite weights only; weights-only reads."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        check_finite_checkpoint(checkpoint, path)
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(
        self, path: Any, map_location: Any = lambda storage, loc: storage, weights_only: bool | None = None
    ) -> dict[str, Any]:
        return load_checkpoint_file(path, map_location=map_location)
