"""bench/gpu.py runs end to end on CPU with --smoke (tiny UNet, ours and diffusers', both checkpointing
modes)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_bench_smoke(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "bench" / "gpu.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "gpu.json"
    rows = bench.main(["--smoke", "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["device"] == "cpu" and data["peak_bf16_flops"] is None and data["rows"] == rows
    assert {(r["impl"], r["grad_ckpt"]) for r in rows} == {
        (i, c) for i in ("ours", "diffusers") for c in (0, 1)
    }
    assert all(
        r["samples_per_s"] > 0 and r["gflop_per_sample"] > 0 and r["mfu"] is r["peak_gib"] is None
        for r in rows
    )
    ours, theirs = (next(r for r in rows if r["impl"] == i) for i in ("ours", "diffusers"))
    assert abs(ours["gflop_per_sample"] / theirs["gflop_per_sample"] - 1) < 0.05  # the same model
    assert bench.peak_flops.__name__ and bench.PEAK_BF16["H200"] == 989e12
