"""Hydra instantiation for the entry points, surfacing the original error instead of Hydra's wrapper."""

from __future__ import annotations

from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig


def build(node: DictConfig, **kwargs: Any) -> Any:
    """hydra.utils.instantiate, re-raising the cause: the user sees its one-line fix, not a wrapped
    traceback."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as exc:
        if exc.__cause__ is not None:
            raise exc.__cause__ from None
        raise
