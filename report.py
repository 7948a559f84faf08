"""Compare runs: `python report.py logs/train/multiruns/<sweep> [more sweep or run dirs] [--out DIR]`.

Writes report.md and report.csv (one row per run: varying overrides, status, steps, wall time, final and best
val/loss, eval/* metrics, checkpoint; sorted by the optimised metric), loss_curves.png (all runs overlaid),
samples.png (each run's last sample grid in a row: same prompts, same seeds) and, for an Optuna sweep, the
study's history / importance / intermediate-value plots. Reads only what the runs wrote; loads no model.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ldm.cli import exit_on_user_error
from ldm.report import make_report

log = logging.getLogger("report")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "paths", nargs="+", type=Path, help="a sweep directory, run directories, or logs/train/runs"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="where to write (default: the one directory given, else ./report)",
    )
    parser.add_argument(
        "--metric",
        default=None,
        help="sort by this metric (default: the study's / runs' optimized_metric, else val/loss)",
    )
    parser.add_argument(
        "--mode",
        choices=("min", "max"),
        default=None,
        help="lowest or highest first (default: the study's direction, else min)",
    )
    return parser.parse_args(argv)


@exit_on_user_error
def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(
        level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s", stream=sys.stderr
    )
    args = parse_args(argv)
    out = args.out or (args.paths[0] if len(args.paths) == 1 else Path("report"))
    result = make_report(args.paths, out, metric=args.metric, mode=args.mode)
    log.info("report: %s", out / "report.md")
    return result


if __name__ == "__main__":
    main()
