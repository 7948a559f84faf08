"""Compare runs at a glance: ``python report.py logs/train/multiruns/<sweep>`` (see ``document.make_report``).

``runs`` reads run directories, ``table`` sorts and tabulates them, ``plots`` draws loss curves, sample rows
and Optuna's plots, ``study`` finds the Optuna study of a sweep. No training code: only the files runs leave
behind.
"""

from ldm.report.document import make_report

__all__ = ["make_report"]
