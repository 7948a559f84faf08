"""Evaluation results on disk: ``eval.json`` (all points, resumable), ``eval.csv`` and PNG plots.

A point is one (checkpoint, CFG scale) scored under one set of settings (n, sampler, steps, seed, EMA, ...).
Its key is those settings plus the checkpoint, its training step (an overwritten last.ckpt is a new point) and
the scale: a finished point with the same key is never redone, and a point under other settings (another n,
say) is a new point, kept beside the old ones: FIDs are comparable only at equal n, so every record carries
all of them.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

METRICS = ("fid", "kid", "kid_std", "clip_score")
CSV_FIELDS = (
    "step",
    "cfg_scale",
    "fid",
    "kid",
    "kid_std",
    "clip_score",
    "n",
    "ref_n",
    "sampler",
    "steps",
    "spacing",
    "seed",
    "use_ema",
    "guidance_rescale",
    "extractor",
    "clip_model",
    "checkpoint",
    "sample_seconds",
    "score_seconds",
)
NOT_IN_KEY = set(METRICS) | {"ref_n", "sample_seconds", "score_seconds", "finished"}


def point_key(record: dict[str, Any]) -> str:
    """Everything that defines the point (settings, checkpoint, scale), not what was measured."""
    return json.dumps({k: v for k, v in record.items() if k not in NOT_IN_KEY}, sort_keys=True)


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class Results:
    """The records of ``out_dir/eval.json``; ``add`` rewrites it (and eval.csv) at once, atomically."""

    def __init__(self, out_dir: str | Path) -> None:
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / "eval.json"
        self.records: list[dict[str, Any]] = []
        if self.path.is_file():
            try:
                self.records = list(json.loads(self.path.read_text())["points"])
            except (ValueError, KeyError, TypeError):
                raise ValueError(
                    f"'{self.path}' is not an eval.json written by eval.py: move it away or pass another "
                    f"out_dir"
                ) from None
        self._done = {point_key(r) for r in self.records}

    def done(self, point: dict[str, Any]) -> bool:
        return point_key(point) in self._done

    def add(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        self._done.add(point_key(record))
        self.out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path, json.dumps({"points": self.records}, indent=1))
        atomic_write(self.out_dir / "eval.csv", to_csv(self.records))

    def matching(self, settings: dict[str, Any]) -> list[dict[str, Any]]:
        """The records made under ``settings`` (the current run's), for plotting like with like."""
        return [r for r in self.records if all(r.get(k) == v for k, v in settings.items())]


def to_csv(records: Sequence[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for record in sorted(records, key=lambda r: (r.get("step") or 0, r["checkpoint"], r["cfg_scale"])):
        writer.writerow({k: ("" if record.get(k) is None else record.get(k)) for k in CSV_FIELDS})
    return buffer.getvalue()


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("plots need matplotlib: pip install -e '.[eval]'") from None
    return plt


def _by(records: Sequence[dict[str, Any]], field: str) -> dict[Any, list[dict[str, Any]]]:
    groups: dict[Any, list[dict[str, Any]]] = {}
    for record in records:
        groups.setdefault(record[field], []).append(record)
    return groups


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def _line_plot(records, group, x, y, title, path: Path, label: str) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for value, rows in sorted(_by(records, group).items(), key=lambda kv: str(kv[0])):
        rows = sorted(rows, key=lambda r: r[x])
        ax.plot([r[x] for r in rows], [r[y] for r in rows], marker="o", label=f"{label} {value}")
    ax.set(xlabel=x, ylabel=y, title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot(records: Sequence[dict[str, Any]], out_dir: str | Path) -> list[Path]:
    """fid_vs_cfg.png; fid_vs_clip.png when CLIP scores exist; fid_vs_step.png over several checkpoints."""
    out_dir = Path(out_dir)
    if not records:
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    n = records[0]["n"]
    paths = [
        _line_plot(
            records,
            "step",
            "cfg_scale",
            "fid",
            f"FID vs CFG scale (n={n})",
            out_dir / "fid_vs_cfg.png",
            "step",
        )
    ]
    if all(r.get("clip_score") is not None for r in records):
        paths.append(
            _line_plot(
                records,
                "step",
                "clip_score",
                "fid",
                f"FID vs CLIP score over CFG (n={n})",
                out_dir / "fid_vs_clip.png",
                "step",
            )
        )
    if len({r["step"] for r in records}) > 1:
        paths.append(
            _line_plot(
                records,
                "cfg_scale",
                "step",
                "fid",
                f"FID vs training step (n={n})",
                out_dir / "fid_vs_step.png",
                "cfg",
            )
        )
    log.info("plots: %s", ", ".join(p.name for p in paths))
    return paths
