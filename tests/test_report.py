"""report.py: one row per run sorted by the optimised metric, loss curves, one row of samples per run — on a
real two-run sweep, and on hand-made run directories for the statuses, resumed metrics and eval metrics."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_overrides
from PIL import Image

pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parents[1]


def report_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "report.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def two_runs(tiny_data: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A two-job sweep (optim.lr=1e-4,3e-3), 2 steps each, validated after each step."""
    tmp = tmp_path_factory.mktemp("report_sweep")
    sweep_dir = tmp / "sweep"
    args = [a for a in tiny_overrides(tiny_data, tmp / "unused") if not a.startswith("paths.output_dir")]
    extra = [
        "trainer.max_steps=2",
        "+trainer.val_check_interval=1",
        "trainer.check_val_every_n_epoch=1",
        "callbacks.sample_grid.steps=2",
        f"hydra.sweep.dir={sweep_dir}",
    ]
    out = subprocess.run(
        [sys.executable, "train.py", "-m", "optim.lr=1e-4,3e-3", *args, *extra],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return sweep_dir


def test_report_on_a_two_run_sweep(two_runs: Path, tmp_path: Path) -> None:
    from ldm.report.plots import LABEL_WIDTH

    out = report_cli(str(two_runs), "--out", str(tmp_path / "rep"))
    assert out.returncode == 0, out.stderr[-3000:]
    rows = read_csv(tmp_path / "rep" / "report.csv")
    assert [r["run"] for r in sorted(rows, key=lambda r: r["optim.lr"])] == ["0", "1"]
    finals = [float(r["final val/loss"]) for r in rows]
    assert finals == sorted(finals)  # best first
    for row in rows:
        summary = json.loads((Path(row["path"]) / "summary.json").read_text())
        assert float(row["final val/loss"]) == summary["metrics"]["val/loss"]
        assert row["status"] == "finished" and row["steps"] == "2" and Path(row["checkpoint"]).is_file()
        assert float(row["best val/loss"]) <= float(row["final val/loss"])
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "![Loss curves](loss_curves.png)" in md and "![Samples (last grid of each run)](samples.png)" in md
    assert len([line for line in md.splitlines() if line.startswith(("| 1 |", "| 2 |"))]) == 2
    assert "`optim.lr`" in md and "optuna" not in md.lower()  # a plain -m sweep: no study

    assert Image.open(tmp_path / "rep" / "loss_curves.png").size == (1300, 450)
    samples = Image.open(tmp_path / "rep" / "samples.png").convert("RGB")
    best = Path(rows[0]["path"])
    grid = Image.open(sorted((best / "samples").glob("step_*.png"))[-1]).convert("RGB")  # 2 prompts x 32 px
    factor = max(1, 96 // grid.height)
    header = 28
    row_height = (samples.height - header) // 2
    assert samples.width == LABEL_WIDTH + grid.width * factor and row_height >= grid.height * factor
    pasted = samples.crop(
        (LABEL_WIDTH, header, LABEL_WIDTH + grid.width * factor, header + grid.height * factor)
    )
    expected = grid.resize((grid.width * factor, grid.height * factor), Image.Resampling.NEAREST)
    assert pasted.tobytes() == expected.tobytes()  # the best run's last grid, first row


def fake_run(root: Path, name: str, summary: dict | None, lr: float, grid: str | None = None) -> Path:
    run = root / name
    (run / "csv").mkdir(parents=True)
    config = {
        "optimized_metric": "val/loss",
        "optim": {"lr": lr},
        "paths": {"output_dir": str(run)},
        "callbacks": {"sample_grid": {"prompts": ["a", "b"], "seed": 0}},
    }
    (run / "config_resolved.yaml").write_text(json.dumps(config))  # JSON is YAML
    if summary is not None:
        (run / "summary.json").write_text(json.dumps(summary))
    if grid is not None:
        (run / "samples").mkdir()
        Image.new("RGB", (64, 32), "red").save(run / "samples" / "step_000002.png")
        Image.new("RGB", (64, 32), grid).save(run / "samples" / "step_000010.png")
    return run


def test_report_statuses_resumed_metrics_and_eval_sorting(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    finished = {"status": "finished", "global_step": 4, "fit_wall_s": 60.0}
    a = fake_run(runs, "a", {**finished, "metrics": {"val/loss": 0.5, "eval/fid": 12.0}}, 1e-4, grid="blue")
    fake_run(runs, "b", {**finished, "metrics": {"val/loss": 0.7, "eval/fid": 8.0}}, 3e-4)
    pruned = {"status": "failed", "error": "TrialPruned: trial 2 pruned at step 2", "global_step": 2}
    fake_run(runs, "c", {**pruned, "metrics": {"val/loss": 0.9, "eval/fid": 5.0}}, 1e-3)
    fake_run(runs, "d", None, 3e-3)  # killed: no summary.json
    # a resumed run: Lightning's CSVLogger replaced metrics.csv, the earlier rows were kept as
    # metrics.part1.csv
    (a / "csv" / "metrics.part1.csv").write_text("step,train/loss,val/loss\n0,1.0,\n1,0.9,0.8\n")
    (a / "csv" / "metrics.csv").write_text("step,train/loss,val/loss\n2,0.7,\n3,0.6,0.45\n")

    from ldm.report import make_report
    from ldm.report.runs import load_run

    assert load_run(a, "a").series("val/loss") == [(1, 0.8), (3, 0.45)]
    result = make_report([runs], tmp_path / "fid", metric="eval/fid")
    assert result["runs"] == ["b", "a", "c", "d"]  # finished by FID, then the pruned run, then no value
    rows = read_csv(tmp_path / "fid" / "report.csv")
    assert [r["status"] for r in rows] == ["finished", "finished", "pruned", "incomplete"]
    assert rows[1]["best val/loss"] == "0.45" and rows[1]["final val/loss"] == "0.5"
    header = list(rows[0])
    assert (
        "optim.lr" in header and "paths.output_dir" not in header
    )  # settings from config_resolved.yaml diffs
    assert make_report([runs], tmp_path / "max", metric="eval/fid", mode="max")["runs"] == [
        "a",
        "b",
        "c",
        "d",
    ]
    assert make_report([runs], tmp_path / "loss")["runs"] == [
        "a",
        "b",
        "c",
        "d",
    ]  # optimized_metric: val/loss

    samples = Image.open(tmp_path / "fid" / "samples.png").convert("RGB")
    row_height = (samples.height - 28) // 4
    assert samples.getpixel((300, 28 + row_height + 5)) == (
        0,
        0,
        255,
    )  # a's newest grid (step 10), second row
    assert samples.getpixel((300, 28 + 5)) == (220, 220, 220)  # b has no grid: a grey row
    assert "no sample grid in b, c, d" in (tmp_path / "fid" / "report.md").read_text()


def test_report_refuses_a_directory_without_runs(tmp_path: Path) -> None:
    out = report_cli(str(tmp_path))
    assert out.returncode == 2 and "holds no run directories" in out.stderr and "Traceback" not in out.stderr
