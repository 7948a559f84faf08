"""Logger factories that need a decision at run time (wandb online vs offline)."""

from __future__ import annotations

import netrc
import os
from collections.abc import Sequence
from pathlib import Path

from lightning.pytorch.loggers import WandbLogger


def wandb_logged_in() -> bool:
    """True when wandb has credentials: WANDB_API_KEY, or an api.wandb.ai entry written by `wandb login`."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc_path = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    if not netrc_path.is_file():
        return False
    try:
        hosts = netrc.netrc(str(netrc_path)).hosts
    except (netrc.NetrcParseError, OSError):
        return False
    base = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1]
    return any(base in host for host in hosts)


def wandb_logger(
    project: str, name: str, save_dir: str, mode: str | None = None, tags: Sequence[str] = ()
) -> WandbLogger:
    """A WandbLogger that runs online when the user is logged in and offline otherwise (no code change).

    ``mode`` (or the WANDB_MODE environment variable) forces "online", "offline" or "disabled".
    """
    mode = mode or os.environ.get("WANDB_MODE") or ("online" if wandb_logged_in() else "offline")
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    return WandbLogger(
        project=project, name=name, save_dir=save_dir, offline=mode == "offline", mode=mode, tags=list(tags)
    )
