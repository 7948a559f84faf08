"""``make_report``: runs -> report.md, report.csv, loss_curves.png, samples.png (+ Optuna plots) in one
directory."""

from __future__ import annotations

import logging
import math
from collections import Counter
from pathlib import Path
from typing import Any

from ldm.report.plots import loss_curves, optuna_plots, samples_image
from ldm.report.runs import Run, find_runs, load_run, run_names
from ldm.report.study import StudyInfo, find_study
from ldm.report.table import LOSS, Table, build_table, markdown_table, write_csv

log = logging.getLogger(__name__)

MODES = ("min", "max")


def make_report(
    paths: list[Path], out_dir: Path, metric: str | None = None, mode: str | None = None
) -> dict[str, Any]:
    """Compare the runs under ``paths`` (sweep or run directories); returns what was written and the sort
    order.

    ``metric``: the column the runs are sorted by (default: the Optuna study's, else the runs'
    optimized_metric, else val/loss); ``mode``: min or max (default: the study's direction, else min).
    """
    if mode is not None and mode not in MODES:
        raise ValueError(f"--mode {mode}: use min or max")
    run_dirs = find_runs(paths)
    runs = [load_run(p, n) for p, n in zip(run_dirs, run_names(run_dirs), strict=True)]
    study = find_study([p.resolve() for p in paths if p.is_dir()] + [p.parent for p in run_dirs])
    metric = metric or (study.metric if study else None) or common_value(runs, "optimized_metric") or LOSS
    mode = mode or (("max" if study.direction == "maximize" else "min") if study else "min")
    out_dir.mkdir(parents=True, exist_ok=True)
    table = build_table(runs, metric, mode, study.trials if study else {})
    write_csv(table, out_dir / "report.csv")
    notes: list[str] = []
    pictures = draw_pictures(table, metric, study, out_dir, notes)
    (out_dir / "report.md").write_text(document(table, paths, metric, mode, study, pictures, notes, out_dir))
    log.info("wrote %s (%d runs, sorted by %s, %s)", out_dir / "report.md", len(runs), metric, mode)
    return {
        "out_dir": out_dir,
        "metric": metric,
        "mode": mode,
        "runs": [r.name for r in table.runs],
        "pictures": pictures,
        "notes": notes,
    }


def common_value(runs: list[Run], key: str) -> str | None:
    values = Counter(str(r.config[key]) for r in runs if r.config and r.config.get(key) is not None)
    return values.most_common(1)[0][0] if values else None


def sample_settings(run: Run) -> tuple[Any, ...] | None:
    grid = ((run.config or {}).get("callbacks") or {}).get("sample_grid")
    if not isinstance(grid, dict):
        return None
    return tuple(str(grid.get(k)) for k in ("prompts", "seed", "steps", "cfg_scale", "sampler", "image_size"))


def draw_pictures(
    table: Table, metric: str, study: StudyInfo | None, out_dir: Path, notes: list[str]
) -> dict[str, str]:
    """Each picture's file name, or why it was not drawn (also added to ``notes``)."""
    pictures: dict[str, str] = {}
    try:
        if not loss_curves(table.runs, out_dir / "loss_curves.png", labels(table)):
            notes.append("loss_curves.png: no run logged train/loss or val/loss to a CSV file (logger=csv)")
        pictures["loss_curves.png"] = "loss_curves.png"
    except ImportError as exc:
        pictures["loss_curves.png"] = f"not drawn: {exc}"
        notes.append(f"loss_curves.png not drawn: {exc}")
    settings = {sample_settings(r) for r in table.runs if sample_settings(r) is not None}
    if len(settings) > 1:
        notes.append(
            "samples.png: the runs sampled with different prompts, seeds or sampler settings "
            "(callbacks.sample_grid); its rows are not directly comparable"
        )
    first = next((r for r in table.runs if sample_settings(r) is not None), None)
    prompts = list(first.config["callbacks"]["sample_grid"]["prompts"]) if first and first.config else None
    short = labels(table)
    captions = [caption(rank, run, metric, short[run.name]) for rank, run in enumerate(table.runs, start=1)]
    missing = samples_image(
        table.runs, out_dir / "samples.png", captions, prompts if len(settings) == 1 else None
    )
    pictures["samples.png"] = "samples.png"
    if missing:
        notes.append(
            f"samples.png: no sample grid in {', '.join(missing)} (stopped before the end of training)"
        )
    if study is not None:
        try:
            pictures |= optuna_plots(study.study, out_dir)
        except ImportError as exc:
            notes.append(f"Optuna plots not drawn: {exc}")
    return pictures


def labels(table: Table, most: int = 3) -> dict[str, str]:
    """Each run's name and its first ``most`` varying settings, e.g. ``3: optim.lr=0.00031``."""
    index = {name: i for i, name in enumerate(table.header)}
    out = {}
    for run, row in zip(table.runs, table.rows, strict=True):
        settings = [f"{k}={short(row[index[k]])}" for k in table.varying[:most]]
        out[run.name] = f"{run.name}: {' '.join(settings)}" if settings else run.name
    return out


def short(value: Any) -> str:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    return f"{number:.4g}" if not str(value).lstrip("-").isdigit() else str(value)


def caption(rank: int, run: Run, metric: str, label: str) -> str:
    value = run.final(metric)
    shown = f"{value:.4g}" if value is not None and math.isfinite(value) else "n/a"
    step = (run.summary or {}).get("global_step")
    settings = label.partition(": ")[2].replace(" ", "\n")
    return (
        f"#{rank} {run.name}\n{run.status}, step {step if step is not None else '?'}\n{metric} "
        f"{shown}\n{settings}"
    )


def document(
    table: Table,
    paths: list[Path],
    metric: str,
    mode: str,
    study: StudyInfo | None,
    pictures: dict[str, str],
    notes: list[str],
    out_dir: Path,
) -> str:
    statuses = Counter(r.status for r in table.runs)
    lines = [
        "# Run report",
        "",
        f"- **Runs:** {len(table.runs)} from {', '.join(f'`{p}`' for p in paths)} "
        f"({', '.join(f'{n} {s}' for s, n in statuses.most_common())})",
        f"- **Sorted by:** final `{metric}`, {'lowest' if mode == 'min' else 'highest'} first; runs without "
        f"it last",
        f"- **Varying settings** from `{table.source}`: "
        + (", ".join(f"`{k}`" for k in table.varying) if table.varying else "none"),
    ]
    if table.common:
        lines.append("- **Shared overrides:** " + " ".join(f"`{o}`" for o in table.common))
    if study is not None:
        lines.append(
            f"- **Optuna study:** `{study.study.study_name}`, {study.direction}, {len(study.trials)} trials"
        )
        best = [t for t in study.study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
        if best:
            top = study.study.best_trial
            lines.append(f"- **Best trial:** {top.number}, value {top.value:.6g}, params `{top.params}`")
    lines += ["", markdown_table(table, out_dir), ""]
    for name, title in (
        ("loss_curves.png", "Loss curves"),
        ("samples.png", "Samples (last grid of each run)"),
        ("optuna_history.png", "Optuna: optimisation history"),
        ("optuna_importance.png", "Optuna: parameter importance"),
        ("optuna_intermediate.png", "Optuna: intermediate values"),
    ):
        if name in pictures:
            shown = pictures[name]
            lines += [f"## {title}", "", f"![{title}]({name})" if shown == name else f"_{shown}_", ""]
    if notes:
        lines += ["## Notes", "", *(f"- {n}" for n in notes), ""]
    return "\n".join(lines)
