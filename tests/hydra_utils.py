"""Kept for tests that still import ``hydra_utils``: the helper lives in ``ldm.config_utils`` (benches use it
too)."""

from ldm.config_utils import CONFIGS, compose_config

__all__ = ["CONFIGS", "compose_config"]
