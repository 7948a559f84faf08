"""Compose the project's Hydra configs in code, the way train.py / sample.py do (tests, benches, notebooks)."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

CONFIGS = str(Path(__file__).resolve().parents[1] / "configs")


def compose_config(name: str, overrides: list[str]) -> DictConfig:
    """The config ``name`` (train, sample, eval) with ``overrides``, hydra node removed, ``${hydra:...}`` resolvable."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        cfg = compose(config_name=name, overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg
