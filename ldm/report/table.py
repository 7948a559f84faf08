"""The comparison table: one row per run, sorted by the optimised metric, as Markdown and as CSV."""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ldm.report.runs import Run

LOSS = "val/loss"


@dataclass
class Table:
    header: list[str]  # CSV columns
    rows: list[list[Any]]  # raw values, in the sorted order of the runs
    runs: list[Run]  # the runs, sorted
    varying: list[str]  # override keys that differ between runs (one column each)
    common: list[str]  # overrides every run shares
    source: str  # where the varying keys come from: ".hydra/overrides.yaml" or "config_resolved.yaml"


def sort_runs(runs: list[Run], metric: str, mode: str) -> list[Run]:
    """Finished runs best first by the final value of ``metric``; then unfinished runs (pruned, interrupted:
    their value is from earlier in training) the same way; runs without a finite value last (in their given
    order)."""
    sign = 1.0 if mode == "min" else -1.0

    def key(run: Run) -> tuple[bool, bool, float]:
        value = run.final(metric)
        missing = value is None or not math.isfinite(value)
        return (missing, run.status != "finished", 0.0 if missing else sign * float(value))  # type: ignore[arg-type]

    return sorted(runs, key=key)


def split_override(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    return (key, value) if sep else (text, "")


def flatten(node: Any, prefix: str = "") -> dict[str, str]:
    if isinstance(node, Mapping):
        out: dict[str, str] = {}
        for k, v in node.items():
            out |= flatten(v, f"{prefix}{k}.")
        return out
    return {prefix[:-1]: str(node)}


def run_settings(runs: list[Run]) -> tuple[list[dict[str, str]], str]:
    """Each run's settings as key -> value: its overrides when every run has them, else its resolved config
    (values naming the run's own directory left out: they differ by construction)."""
    if all(r.overrides is not None for r in runs):
        return [dict(split_override(o) for o in r.overrides or []) for r in runs], ".hydra/overrides.yaml"
    settings = []
    for run in runs:
        flat = flatten(run.config or {})
        settings.append({k: v for k, v in flat.items() if str(run.path) not in v})
    return settings, "config_resolved.yaml"


def varying_keys(settings: list[dict[str, str]]) -> tuple[list[str], list[str]]:
    """(keys whose value differs between runs, ``key=value`` shared by all runs)."""
    keys = list(dict.fromkeys(k for s in settings for k in s))
    varying = [k for k in keys if len({s.get(k) for s in settings}) > 1]
    common = [k if settings[0][k] == "" else f"{k}={settings[0][k]}" for k in keys if k not in varying]
    return varying, common


def eval_keys(runs: list[Run]) -> list[str]:
    """Sample-quality metrics logged by any run (``eval/fid``, ``eval/kid``, ``eval/clip_score``, ...)."""
    keys = {k for r in runs for k in r.metrics if k.startswith("eval/")}
    keys |= {k for r in runs for row in r.rows for k in row if k.startswith("eval/")}
    return sorted(keys)


def build_table(runs: list[Run], metric: str, mode: str, trials: Mapping[Path, tuple[int, str]]) -> Table:
    runs = sort_runs(runs, metric, mode)
    settings, source = run_settings(runs)
    varying, common = varying_keys(settings)
    evals = eval_keys(runs)
    extra = [] if metric in (LOSS, *evals) else [metric]
    header = ["rank", "run", "status"]
    header += ["trial", "trial_state"] if trials else []
    header += [
        *varying,
        "steps",
        "fit_wall_s",
        f"final {LOSS}",
        f"best {LOSS}",
        *evals,
        *extra,
        "checkpoint",
        "path",
    ]
    rows = []
    for rank, (run, setting) in enumerate(zip(runs, settings, strict=True), start=1):
        summary = run.summary or {}
        row: list[Any] = [rank, run.name, run.status]
        if trials:
            row += list(trials.get(run.path, ("", "")))
        row += [setting.get(k, "") for k in varying]
        row += [summary.get("global_step"), summary.get("fit_wall_s"), run.final(LOSS), run.best(LOSS)]
        row += [run.final(k) for k in (*evals, *extra)]
        row += [str(run.checkpoint) if run.checkpoint else "", str(run.path)]
        rows.append(row)
    return Table(header, rows, runs, varying, common, source)


def write_csv(table: Table, path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(table.header)
        writer.writerows([["" if v is None else v for v in row] for row in table.rows])


def markdown_table(table: Table, out_dir: Path) -> str:
    """The table for report.md: numbers to 4 significant digits, wall time in minutes, paths relative."""
    header = [{"fit_wall_s": "fit wall"}.get(h, h) for h in table.header if h != "path"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in table.rows:
        cells = []
        for name, value in zip(table.header, row, strict=True):
            if name == "path":
                continue
            cells.append(_cell(name, value, out_dir))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(name: str, value: Any, out_dir: Path) -> str:
    if value is None or value == "":
        return "–"
    if name == "fit_wall_s":
        return f"{float(value) / 60:.1f} min"
    if name == "checkpoint":
        return f"`{os.path.relpath(value, out_dir)}`"
    if isinstance(value, float):
        return f"{value:.4g}"
    text = str(value)
    try:
        number = float(text)
    except ValueError:
        return text.replace("|", "\\|")
    return f"{number:.4g}" if "." in text or "e" in text.lower() else text
