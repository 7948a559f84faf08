"""train.py as users run it: a two-process DDP run on CPU (gloo) over uneven shards, and a two-run sweep."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import tiny_overrides

ROOT = Path(__file__).resolve().parents[1]


def train_cli(args: list[str], timeout: int = 400) -> subprocess.CompletedProcess:
    out = subprocess.run(
        [sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def test_ddp_two_cpu_processes_uneven_shards(tiny_data: dict, tmp_path: Path) -> None:
    """3 shards over 2 ranks (rank 0 reads 2, rank 1 reads 1): both ranks run the same steps, no hang."""
    out_dir = tmp_path / "ddp"
    args = tiny_overrides(
        tiny_data,
        out_dir,
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.precision=32-true",
        "trainer.max_steps=-1",
        "trainer.max_epochs=2",
        "trainer.check_val_every_n_epoch=1",
        "callbacks.sample_grid.every_n_steps=0",
        "hydra.run.dir=" + str(out_dir),
    )
    train_cli(args)
    summary = json.loads((out_dir / "summary.json").read_text())
    # 120 train samples in 3 shards; per rank per epoch: 120 // (2 ranks * 16) = 3 batches; 2 epochs -> 6
    # steps
    assert summary["global_step"] == 6
    from ldm.lit.checkpoint_io import load_checkpoint_file

    ckpt = load_checkpoint_file(out_dir / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 6 and ckpt["epoch"] >= 1 and "ema_state_dict" in ckpt


def test_multirun_sweep_writes_separate_run_dirs(tiny_data: dict, tmp_path: Path) -> None:
    sweep_dir = tmp_path / "sweep"
    args = [a for a in tiny_overrides(tiny_data, tmp_path / "unused") if not a.startswith("paths.output_dir")]
    train_cli(["-m", "optim.lr=1e-4,3e-4", *args, "trainer.max_steps=2", f"hydra.sweep.dir={sweep_dir}"])
    runs = sorted(p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit())
    assert [p.name for p in runs] == ["0", "1"]
    lrs = []
    for run in runs:
        assert (run / "checkpoints" / "last.ckpt").is_file()
        lrs.append(float((run / "config_resolved.yaml").read_text().split("lr: ")[1].split()[0]))
    assert lrs == [1e-4, 3e-4]
