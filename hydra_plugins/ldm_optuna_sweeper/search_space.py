"""Search spaces written in Hydra's sweep grammar, turned into Optuna distributions, and trial values back
into Hydra overrides.

| override                              | Optuna distribution                                   |
| ------------------------------------- | ----------------------------------------------------- |
| ``a,b,c`` or ``choice(a, b, c)``      | categorical over the values                           |
| ``interval(lo, hi)``                  | float uniform in [lo, hi]                             |
| ``int(interval(lo, hi))``             | int uniform in [lo, hi]                               |
| ``tag(log, interval(lo, hi))``        | the same on a log scale                               |
| ``range(start, stop[, step])``        | the values of Python's range (stop excluded), stepped |

Any other override (``key=value``) is fixed: every trial gets it unchanged.
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Any, NamedTuple

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, QuotedString, RangeSweep

if TYPE_CHECKING:
    from optuna.distributions import BaseDistribution

_PLAIN = re.compile(r"[A-Za-z0-9_./:@+\-]+")


class SearchSpace(NamedTuple):  # not a dataclass: Hydra's plugin scan runs this module outside sys.modules
    """``distributions``: Optuna parameter name (the override key) -> distribution; ``fixed``: overrides as
    typed."""

    distributions: dict[str, BaseDistribution]
    fixed: list[str]


def parse_search_space(lines: list[str]) -> SearchSpace:
    """Split overrides into swept parameters (with their distributions) and fixed overrides.

    A key given twice keeps the last occurrence (``hydra.sweeper.params`` first, then the command line), so a
    command-line override replaces or fixes a parameter of the config's search space.
    """
    overrides = OverridesParser.create().parse_overrides(overrides=lines)
    by_key: dict[str, Override] = {}
    for override in overrides:
        by_key.pop(override.get_key_element(), None)  # the last one wins and moves to the end
        by_key[override.get_key_element()] = override
    distributions: dict[str, BaseDistribution] = {}
    fixed: list[str] = []
    for key, override in by_key.items():
        if override.is_sweep_override():
            distributions[key] = to_distribution(key, override)
        else:
            assert override.input_line is not None
            fixed.append(override.input_line)
    return SearchSpace(distributions, fixed)


def to_distribution(key: str, override: Override) -> BaseDistribution:
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    sweep = override.value()
    log = "log" in getattr(sweep, "tags", set())
    if isinstance(sweep, ChoiceSweep):
        choices = [plain(v) for v in sweep.list]
        bad = [v for v in choices if v is not None and not isinstance(v, bool | int | float | str)]
        if bad:
            raise ValueError(f"{key}: choice() takes numbers, strings, booleans or null, not {bad}")
        return CategoricalDistribution(choices)
    if isinstance(sweep, IntervalSweep):
        assert sweep.start is not None and sweep.end is not None
        if isinstance(sweep.start, int) and isinstance(sweep.end, int):
            return IntDistribution(sweep.start, sweep.end, log=log)
        return FloatDistribution(float(sweep.start), float(sweep.end), log=log)
    if isinstance(sweep, RangeSweep):
        values = list(sweep.range())
        if not values:
            raise ValueError(f"{key}: {override.input_line} is an empty range")
        step = sweep.step
        if all(isinstance(v, int) for v in values) and isinstance(step, int) and step > 0:
            return IntDistribution(values[0], values[-1], step=step)
        if step > 0:
            return FloatDistribution(float(values[0]), float(values[-1]), step=float(step))
        return CategoricalDistribution(values)
    raise ValueError(
        f"{key}: {override.input_line} is not a search space Optuna can sample; use choice(), interval(), "
        "int(interval()), tag(log, interval()) or range()"
    )


def plain(value: Any) -> Any:
    """A parsed override element as a plain Python value (quoted strings unquoted)."""
    return value.text if isinstance(value, QuotedString) else value


def format_value(value: Any) -> str:
    """A trial's parameter value as the value of a Hydra override."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else str(value)  # nan, inf, -inf: Hydra's spellings
    text = str(value)
    if _PLAIN.fullmatch(text):
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def trial_overrides(params: dict[str, Any], fixed: list[str]) -> list[str]:
    """The overrides of one job: the fixed ones, then ``key=value`` for each sampled parameter."""
    return [*fixed, *(f"{key}={format_value(value)}" for key, value in params.items())]
