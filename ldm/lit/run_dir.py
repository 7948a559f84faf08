"""Run directories and what resumes into them.

- Every run gets its own directory: ``<timestamp>_<6 hex>`` (two runs started in the same second differ), or
  under SLURM ``slurm-<job>[_<array task>]`` so that a requeued job finds its own checkpoints again.
  Registered as the OmegaConf resolver ``${ldm_run_id:}`` that ``configs/hydra/default.yaml`` uses.
- ``ckpt_path=last`` (or ``latest``) resumes from the newest complete checkpoint of this run directory, else
  of the most recent run under ``<log_dir>/<task>/runs``; it fails when there is none. "Newest" is the highest
  step, then the newest file; files that do not load (truncated) are skipped with a warning.
- A run directory that already holds checkpoints is refused unless the run resumes (``ckpt_path=...``) or is a
  SLURM / torchrun restart of itself (then it resumes automatically). Temporary files of checkpoint writes
  that were killed are removed when a run directory is reused.
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from pathlib import Path

from omegaconf import OmegaConf

from ldm.cli import UserError
from ldm.lit.checkpoint_io import TMP_SUFFIX, load_checkpoint_file, remove_stale_temporaries

log = logging.getLogger(__name__)

LAST = ("last", "latest")
_RUN_ID: list[str] = []


def run_id() -> str:
    """One name per process (a Hydra multirun shares it; DDP children receive the parent's directory)."""
    if not _RUN_ID:
        job = os.environ.get("SLURM_JOB_ID")
        if job is not None:
            array = os.environ.get("SLURM_ARRAY_JOB_ID")
            name = f"slurm-{array}_{os.environ.get('SLURM_ARRAY_TASK_ID', '0')}" if array else f"slurm-{job}"
        else:
            name = f"{time.strftime('%Y-%m-%d_%H-%M-%S')}_{secrets.token_hex(3)}"
        _RUN_ID.append(name)
    return _RUN_ID[0]


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("ldm_run_id"):
        # cached on the config object: a launcher that pickles the config (joblib, submitit) keeps the sweep's
        # name
        OmegaConf.register_new_resolver("ldm_run_id", run_id, use_cache=True)


def is_restart() -> bool:
    """A scheduler restarted this job (SLURM requeue, torchrun elastic restart)."""
    counts = (os.environ.get("SLURM_RESTART_COUNT", "0"), os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    return any(c.isdigit() and int(c) > 0 for c in counts)


def is_launcher_child() -> bool:
    """A DDP process other than the first (torchrun, SLURM, Lightning's launcher): rank 0 prepares the
    directory."""
    ranks = (os.environ.get(k, "0") for k in ("RANK", "LOCAL_RANK", "SLURM_PROCID"))
    return any(r.isdigit() and int(r) > 0 for r in ranks)


def checkpoint_step(path: Path) -> int | None:
    """The global step stored in a checkpoint, None when it does not load (truncated, not a checkpoint)."""
    try:
        ckpt = load_checkpoint_file(path, mmap=True)  # reads the pickle, not the tensor data
    except Exception as exc:  # a damaged file is skipped, never chosen
        log.warning("skipping checkpoint %s: it does not load (%s)", path, " ".join(str(exc).split())[:200])
        return None
    step = ckpt.get("global_step") if isinstance(ckpt, dict) else None
    return int(step) if isinstance(step, int) else None


def run_checkpoints(run_dir: Path) -> list[Path]:
    """A run's checkpoint files: ``checkpoints/*.ckpt`` and Lightning's SLURM ``hpc_ckpt_*.ckpt`` beside
    them."""
    return [*(run_dir / "checkpoints").glob("*.ckpt"), *run_dir.glob("hpc_ckpt_*.ckpt")]


def newest_checkpoint(run_dir: Path) -> tuple[Path, int] | None:
    """(path, step) of the run's complete checkpoint with the highest step, then the newest file."""
    best: tuple[int, bool, float, Path] | None = None
    for path in run_checkpoints(run_dir):
        if not path.is_file() or path.name.endswith(TMP_SUFFIX):
            continue
        step = checkpoint_step(path)
        if step is None:
            continue
        key = (
            step,
            path.name == "last.ckpt",
            path.stat().st_mtime,
            path,
        )  # equal steps: last.ckpt, then newest
        if best is None or key[:3] > best[:3]:
            best = key
    return None if best is None else (best[3], best[0])


def resolve_resume(ckpt_path: str | None, output_dir: Path, runs_root: Path) -> Path | None:
    """The checkpoint a run starts from: None (fresh), a path, or the newest of this / the latest run."""
    if ckpt_path is None or str(ckpt_path) == "":
        return None
    if str(ckpt_path) not in LAST:
        path = Path(str(ckpt_path))
        if not path.is_file():
            raise FileNotFoundError(
                f"ckpt_path={path}: no such checkpoint — pass an existing .ckpt, or ckpt_path=last for the "
                f"newest "
                "checkpoint of the latest run"
            )
        if checkpoint_step(path) is None:
            raise UserError(
                f"ckpt_path={path} does not load as a training checkpoint (empty, truncated or another kind "
                f"of "
                "file): pass another one, or ckpt_path=last for the newest complete checkpoint"
            )
        return path
    own = newest_checkpoint(output_dir)
    if own is not None:
        log.info(
            "ckpt_path=%s: resuming from %s (step %d), the newest complete checkpoint of this run",
            ckpt_path,
            own[0],
            own[1],
        )
        return own[0]
    runs = sorted(
        (p for p in runs_root.glob("*/checkpoints") if p.parent.resolve() != output_dir.resolve()),
        key=lambda p: p.stat().st_mtime,
        reverse=True,
    )
    for directory in runs:
        found = newest_checkpoint(directory.parent)
        if found is not None:
            log.info(
                "ckpt_path=%s: resuming from %s (step %d), the newest complete checkpoint of the latest run "
                "%s",
                ckpt_path,
                found[0],
                found[1],
                directory.parent,
            )
            return found[0]
    raise FileNotFoundError(
        f"ckpt_path={ckpt_path}: no complete checkpoint in {output_dir / 'checkpoints'} or "
        f"{runs_root}/*/checkpoints "
        "— train first, or pass ckpt_path=PATH"
    )


def prepare_run_dir(output_dir: Path, ckpt_path: str | None, runs_root: Path) -> Path | None:
    """Clean up after killed writes, refuse to mix two runs in one directory, and return the checkpoint to
    resume.

    A scheduler restart (SLURM requeue, torchrun restart) resumes from the run's own newest checkpoint on
    every rank, whatever ``ckpt_path`` says: the progress made before the preemption wins over the starting
    point.
    """
    first = not is_launcher_child()
    checkpoints = output_dir / "checkpoints"
    if first and checkpoints.is_dir():
        remove_stale_temporaries(checkpoints)
    existing = newest_checkpoint(output_dir)
    if existing is not None and is_restart():
        log.info("restarted job: resuming from %s (step %d), the newest checkpoint of this run", *existing)
        resume: Path | None = existing[0]
    else:
        resume = resolve_resume(ckpt_path, output_dir, runs_root)
        if resume is None and existing is not None and first:
            raise UserError(
                f"run directory {output_dir} already holds checkpoints (newest {existing[0].name}, step "
                f"{existing[1]}): pass ckpt_path=last to continue that run, or leave hydra.run.dir unset for "
                f"a new "
                "directory"
            )
    if first:
        keep_metrics(output_dir)
    return resume


def keep_metrics(output_dir: Path) -> list[Path]:
    """Lightning's CSVLogger deletes an existing metrics.csv: a run continued in its own directory keeps the
    earlier rows as ``metrics.part<k>.csv`` beside the new file."""
    kept = []
    for path in sorted(output_dir.glob("**/metrics.csv")):
        k = 1
        while (target := path.with_name(f"metrics.part{k}.csv")).exists():
            k += 1
        path.rename(target)
        kept.append(target)
        log.info("kept the earlier metrics of this run directory as %s", target)
    return kept
