"""Compose the project's Hydra configs in code, the way train.py / sample.py do (tests, benches,
notebooks)."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, ListConfig, open_dict

CONFIGS = str(Path(__file__).resolve().parents[1] / "configs")


def compose_config(name: str, overrides: list[str]) -> DictConfig:
    """The config ``name`` (train, sample, eval) with ``overrides``, hydra node removed, ``${hydra:...}``
    resolvable."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        cfg = compose(config_name=name, overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


CLASS_CONDITIONER = "ldm.conditioning.labels.ClassConditioner"


def fill_label_vocabulary(node: DictConfig, labels: list[str] | None) -> bool:
    """Give every ClassConditioner node under ``node`` (e.g. ``cfg.model.conditioner``) the training shards'
    label names (``index.json`` "labels") when its ``labels`` is null, and ``num_classes`` when that is null
    too, so the checkpoint's stored config carries the vocabulary (``sample.py label=<name>``). Returns
    whether it changed."""
    if not labels:
        return False
    changed = False
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, ListConfig):
            stack.extend(v for v in item if isinstance(v, DictConfig | ListConfig))
        elif isinstance(item, DictConfig):
            if item.get("_target_") == CLASS_CONDITIONER and item.get("labels") is None:
                with open_dict(item):
                    item.labels = list(labels)
                    if item.get("num_classes") is None:
                        item.num_classes = len(labels)
                changed = True
            stack.extend(v for k, v in item.items_ex(resolve=False) if isinstance(v, DictConfig | ListConfig))
    return changed
