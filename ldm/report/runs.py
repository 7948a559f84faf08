"""What a run directory says about its run: summary, overrides, resolved config, logged metrics, samples,
checkpoint.

A run directory is what ``train.py`` writes (``summary.json``, ``config_resolved.yaml``,
``.hydra/overrides.yaml``, ``csv/metrics.csv``, ``samples/step_*.png``, ``checkpoints/*.ckpt``); a sweep
directory holds one per job.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from ldm.cli import UserError

log = logging.getLogger(__name__)

RUN_MARKERS = ("summary.json", "config_resolved.yaml", ".hydra/overrides.yaml")
_PART = re.compile(r"metrics\.part(\d+)\.csv")
_STEP = re.compile(r"step_(\d+)\.png")


@dataclass
class Run:
    path: Path
    name: str
    summary: dict[str, Any] | None
    overrides: list[str] | None
    config: dict[str, Any] | None
    rows: list[dict[str, float]] = field(
        default_factory=list
    )  # logged metrics, oldest first (resumed parts too)

    @property
    def status(self) -> str:
        """finished | interrupted | diverged | failed | pruned (an Optuna trial) | incomplete (no
        summary.json)."""
        if self.summary is None:
            return "incomplete"
        if str(self.summary.get("error") or "").startswith("TrialPruned"):
            return "pruned"
        return str(self.summary.get("status", "unknown"))

    @property
    def metrics(self) -> dict[str, float]:
        return dict((self.summary or {}).get("metrics") or {})

    def series(self, key: str) -> list[tuple[int, float]]:
        """(step, value) of a logged metric, one value per step (the later row wins: a resumed run
        re-logs)."""
        points: dict[int, float] = {}
        for row in self.rows:
            if key in row and "step" in row and math.isfinite(row[key]):
                points[int(row["step"])] = row[key]
        return sorted(points.items())

    def final(self, key: str) -> float | None:
        """The run's final value of ``key``: summary.json's metrics, else the last logged value."""
        value = self.metrics.get(key)
        if value is None:
            points = self.series(key)
            value = points[-1][1] if points else None
        return float(value) if value is not None else None

    def best(self, key: str, mode: str = "min") -> float | None:
        values = [v for _, v in self.series(key)]
        final = self.final(key)
        if final is not None and math.isfinite(final):
            values.append(final)
        if not values:
            return None
        return min(values) if mode == "min" else max(values)

    @property
    def checkpoint(self) -> Path | None:
        """``checkpoints/last.ckpt``, else the newest checkpoint file."""
        last = self.path / "checkpoints" / "last.ckpt"
        if last.is_file():
            return last
        found = sorted((self.path / "checkpoints").glob("*.ckpt"), key=lambda p: p.stat().st_mtime)
        return found[-1] if found else None

    @property
    def last_samples(self) -> Path | None:
        """The sample grid of the highest step (SampleGrid writes one at the end of training)."""
        grids = [
            (int(m.group(1)), p)
            for p in (self.path / "samples").glob("step_*.png")
            if (m := _STEP.fullmatch(p.name))
        ]
        return max(grids)[1] if grids else None


def is_run_dir(path: Path) -> bool:
    return path.is_dir() and any((path / marker).exists() for marker in RUN_MARKERS)


def find_runs(paths: list[Path]) -> list[Path]:
    """Run directories among ``paths``: each is a run directory, or a directory of them (a sweep,
    ``runs/``)."""
    found: list[Path] = []
    for path in paths:
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: no such directory — pass a sweep directory or run directories")
        if is_run_dir(path):
            found.append(path)
            continue
        children = sorted((p for p in path.iterdir() if is_run_dir(p)), key=_natural)
        if not children:
            raise UserError(
                f"{path} holds no run directories (none has {', '.join(RUN_MARKERS)}): pass a sweep "
                f"directory "
                "(logs/train/multiruns/<sweep>) or run directories (logs/train/runs/<run>)"
            )
        found.extend(children)
    unique = list(dict.fromkeys(p.resolve() for p in found))
    return unique


def _natural(path: Path) -> tuple[int, int | str]:
    return (0, int(path.name)) if path.name.isdigit() else (1, path.name)


def load_run(path: Path, name: str) -> Run:
    summary = _read_json(path / "summary.json")
    overrides_file = path / ".hydra" / "overrides.yaml"
    overrides = _read_yaml(overrides_file) if overrides_file.is_file() else None
    config = _read_yaml(path / "config_resolved.yaml") if (path / "config_resolved.yaml").is_file() else None
    return Run(
        path=path,
        name=name,
        summary=summary,
        overrides=[str(o) for o in overrides] if isinstance(overrides, list) else None,
        config=config if isinstance(config, dict) else None,
        rows=read_metric_rows(path),
    )


def run_names(paths: list[Path]) -> list[str]:
    """Short unique labels: the path below the common parent (``3`` in a sweep, ``<date>_<time>_<hex>`` in
    runs/)."""
    if len(paths) == 1:
        return [paths[0].name]
    parts = [p.parts for p in paths]
    common = 0
    while all(len(p) > common + 1 for p in parts) and len({p[common] for p in parts}) == 1:
        common += 1
    return ["/".join(p[common:]) for p in parts]


def read_metric_rows(run_dir: Path) -> list[dict[str, float]]:
    """Every row of the run's CSV metrics, earlier parts of a resumed run (``metrics.part<k>.csv``) first."""
    files = sorted(run_dir.glob("**/metrics*.csv"), key=_metrics_order)
    rows: list[dict[str, float]] = []
    for path in files:
        try:
            with path.open(newline="") as f:
                for raw in csv.DictReader(f):
                    row = {k: float(v) for k, v in raw.items() if k and v not in (None, "") and _is_float(v)}
                    if row:
                        rows.append(row)
        except (OSError, csv.Error) as exc:
            log.warning("skipping unreadable metrics file %s: %s", path, exc)
    return rows


def _metrics_order(path: Path) -> tuple[str, int]:
    match = _PART.fullmatch(path.name)
    return (str(path.parent), int(match.group(1)) if match else 1 << 30)  # parts in order, metrics.csv last


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        log.warning("skipping unreadable %s: %s", path, exc)
        return None
    return data if isinstance(data, dict) else None


def _read_yaml(path: Path) -> Any:
    try:
        return OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except Exception as exc:  # OSError or any OmegaConf/YAML parse error: the file is reported, the run kept
        log.warning("skipping unreadable %s: %s", path, exc)
        return None
