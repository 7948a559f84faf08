"""The report's pictures: loss curves of all runs overlaid, one row of samples per run, Optuna's study
plots."""

from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from ldm.report.runs import Run

log = logging.getLogger(__name__)

LABEL_WIDTH = 260  # px of the run label left of each row of samples.png
MIN_ROW_HEIGHT = 96  # px: 32-px grids are enlarged (nearest neighbour, integer factor) to at least this


def pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend (files only), or a one-line error naming the install."""
    try:
        import matplotlib
    except ImportError as exc:
        raise ImportError("report plots need matplotlib: pip install -e '.[sweep]'") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def loss_curves(
    runs: list[Run], path: Path, labels: dict[str, str], keys: tuple[str, ...] = ("train/loss", "val/loss")
) -> bool:
    """One panel per metric, one line per run (resumed runs include the rows of their earlier parts)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(keys), figsize=(6.5 * len(keys), 4.5), squeeze=False)
    drawn = False
    for ax, key in zip(axes[0], keys, strict=True):
        for run in runs:
            points = run.series(key)
            if points:
                steps, values = zip(*points, strict=True)
                marker = "o" if len(points) < 20 else None
                ax.plot(steps, values, label=labels.get(run.name, run.name), marker=marker, markersize=3)
                drawn = True
        ax.set_title(key)
        ax.set_xlabel("step")
        values = [v for run in runs for _, v in run.series(key)]
        if values and min(values) > 0 and max(values) / min(values) > 10:  # log only when it spans a decade
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    if not handles:
        handles, labels = axes[0][-1].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize="small")
        fig.tight_layout(rect=(0, 0.06 + 0.04 * math.ceil(len(labels) / 4), 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return drawn


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one bitmap size
        return ImageFont.load_default()


def samples_image(runs: list[Run], path: Path, captions: list[str], prompts: list[str] | None) -> list[str]:
    """``samples.png``: each run's last sample grid in a row (same prompts, same seeds), its caption on the
    left.

    Returns the names of the runs without a sample grid (a grey row says so).
    """
    grids = {run.name: Image.open(run.last_samples).convert("RGB") for run in runs if run.last_samples}
    height = max([MIN_ROW_HEIGHT, *(g.height for g in grids.values())])
    scaled = {name: _enlarge(grid, height) for name, grid in grids.items()}
    lines = max(len(c.split("\n")) for c in captions) if captions else 1
    height = max(height, 16 * min(lines, 8) + 12)  # room for the caption; grids sit at the top of their row
    width = max([g.width for g in scaled.values()], default=8 * height)
    header = 28 if prompts else 0
    canvas = Image.new("RGB", (LABEL_WIDTH + width, header + height * len(runs)), "white")
    draw = ImageDraw.Draw(canvas)
    font = _font(13)
    if prompts:
        column = width / len(prompts)
        for i, prompt in enumerate(prompts):
            draw.text(
                (LABEL_WIDTH + i * column + 4, 8),
                _fit(draw, prompt, font, column - 8),
                fill="black",
                font=font,
            )
    missing = []
    for row, (run, caption) in enumerate(zip(runs, captions, strict=True)):
        top = header + row * height
        grid = scaled.get(run.name)
        if grid is None:
            missing.append(run.name)
            draw.rectangle(
                (LABEL_WIDTH, top, LABEL_WIDTH + width - 1, top + height - 1), fill=(220, 220, 220)
            )
            draw.text((LABEL_WIDTH + 8, top + height // 2 - 7), "no sample grid", fill="black", font=font)
        else:
            canvas.paste(grid, (LABEL_WIDTH, top))
        for k, line in enumerate(caption.split("\n")[:8]):
            draw.text(
                (6, top + 6 + 16 * k), _fit(draw, line, font, LABEL_WIDTH - 12), fill="black", font=font
            )
    canvas.save(path)
    return missing


def _enlarge(grid: Image.Image, height: int) -> Image.Image:
    factor = max(1, height // grid.height)
    return (
        grid.resize((grid.width * factor, grid.height * factor), Image.Resampling.NEAREST)
        if factor > 1
        else grid
    )


def _fit(draw: ImageDraw.ImageDraw, text: str, font: Any, width: float) -> str:
    while text and draw.textlength(text, font=font) > width:
        text = text[:-2] + "…" if len(text) > 2 else ""
    return text


def optuna_plots(study: Any, out_dir: Path) -> dict[str, str]:
    """Optuna's history, parameter importance and intermediate values as PNGs; name -> file or why not
    drawn."""
    plt = pyplot()
    import optuna.visualization.matplotlib as ovm

    written: dict[str, str] = {}
    for name, plot in (
        ("optuna_history.png", ovm.plot_optimization_history),
        ("optuna_importance.png", ovm.plot_param_importances),
        ("optuna_intermediate.png", ovm.plot_intermediate_values),
    ):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # ExperimentalWarning of the matplotlib backend
                ax = plot(study)
        except (
            ValueError,
            RuntimeError,
            ZeroDivisionError,
        ) as exc:  # e.g. importance needs 2 completed trials
            written[name] = f"not drawn: {' '.join(str(exc).split())}"
            log.warning("%s not drawn: %s", name, exc)
            continue
        fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
        fig.set_size_inches(8, 5)
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=100)
        plt.close(fig)
        written[name] = name
    return written
