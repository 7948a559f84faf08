"""Helpers for the data-order tests: a callback that records the sample keys trained on, per step and rank,
and a two-process gloo reader (run as a script) that reads epochs of the shards in lockstep, as DDP would.

    python tests/resume_helpers.py --rank R --world 2 --port P --shards 'dir/train-*.tar' --out DIR
"""

from __future__ import annotations

import argparse
import csv
import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning as L
import torch

CONFIGS = (("exact", 1), ("exact", 2), ("resampled", 1), ("resampled", 2))  # (data.mode, num_workers)
EPOCHS = (0, 1)


class KeyRecorder(L.Callback):
    """Writes ``keys_rank{r}.json`` ({global step: [sample keys]}) to the run directory when training ends."""

    def __init__(self) -> None:
        self.keys: dict[int, list[str]] = {}

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.keys[trainer.global_step] = list(batch["__key__"])

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        path = Path(trainer.default_root_dir) / f"keys_rank{trainer.global_rank}.json"
        path.write_text(json.dumps(self.keys))


def read_keys(run_dir: Path, rank: int = 0) -> dict[int, list[str]]:
    return {int(k): v for k, v in json.loads((run_dir / f"keys_rank{rank}.json").read_text()).items()}


def read_losses(run_dir: Path) -> dict[int, float]:
    rows = list(csv.DictReader(open(run_dir / "csv" / "metrics.csv")))
    return {int(r["step"]): float(r["train/loss"]) for r in rows if r.get("train/loss")}


def gloo_reader(rank: int, world: int, port: int, shards: str, out: Path) -> None:
    """Every (mode, workers) of CONFIGS for every epoch of EPOCHS: one all_reduce per batch (a rank with fewer
    batches would leave the other waiting, then fail on the timeout); writes ``gloo_rank{r}.json``."""
    from ldm.data import ShardDataModule

    dist = torch.distributed
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=60),
    )
    result: dict[str, list[list[list[str]]]] = {}
    for mode, workers in CONFIGS:
        dm = ShardDataModule(shards, batch_size=16, num_workers=workers, mode=mode, shuffle_buffer=8)
        dm.setup("fit")
        epochs = []
        for epoch in EPOCHS:
            dm.set_epoch(epoch)
            keys = []
            for batch in dm.train_dataloader():
                keys.append(batch["__key__"])
                dist.all_reduce(torch.ones(1))
            dist.barrier()
            epochs.append(keys)
        result[f"{mode}/{workers}"] = epochs
    (out / f"gloo_rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    for name, kind in (
        ("--rank", int),
        ("--world", int),
        ("--port", int),
        ("--shards", str),
        ("--out", Path),
    ):
        parser.add_argument(name, type=kind, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    gloo_reader(args.rank, args.world, args.port, args.shards, args.out)
