"""Every configured backbone, conditioner and noise schedule satisfies its Protocol in ``ldm.interfaces``."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from ldm.conditioning.multi import MultiConditioner
from ldm.config_utils import CONFIGS, compose_config, fill_label_vocabulary
from ldm.interfaces import BACKBONE_ARGS, Backbone, Conditioner, Schedule


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONFIGS) / group).glob("*.yaml"))


@pytest.mark.parametrize("name", options("net"))
def test_every_net_is_a_backbone(name: str) -> None:
    cfg = compose_config("train", [f"net={name}"])
    with torch.device("meta"):  # no memory, no init time: unet_sd has 860M parameters
        net = instantiate(cfg.net)
    assert isinstance(net, Backbone), f"configs/net/{name}.yaml builds {type(net).__name__}, not a Backbone"
    args = tuple(inspect.signature(net.forward).parameters)
    assert args[: len(BACKBONE_ARGS)] == BACKBONE_ARGS, f"{type(net).__name__}.forward{args}"


@pytest.mark.parametrize("name", options("diffusion"))
def test_every_schedule_is_a_schedule(name: str) -> None:
    schedule = instantiate(compose_config("train", [f"diffusion={name}"]).diffusion.schedule)
    assert isinstance(schedule, Schedule), f"configs/diffusion/{name}.yaml: {schedule!r} is not a Schedule"
    assert schedule.default_spacing in schedule.spacings


def test_every_conditioner_is_a_conditioner() -> None:
    """Each conditioner class is checked on an instance; hub-only configs (clip) share a class with a local
    one."""
    checked: dict[str, bool] = {}
    for name in options("conditioner"):
        cfg = compose_config("train", [f"conditioner={name}"]).conditioner
        fill_label_vocabulary(
            cfg, [f"class{i}" for i in range(10)]
        )  # what train.py does with labelled shards
        try:
            conditioner = instantiate(cfg)
        except Exception as err:  # noqa: BLE001 - hydra wraps the loader's OSError; only hub-only models fail here
            assert "could not load text encoder" in str(err), err
            checked.setdefault(cfg._target_, False)
            continue
        # several conditioners per model: each of them is a Conditioner
        parts = conditioner.conditioners if isinstance(conditioner, MultiConditioner) else [conditioner]
        for part in parts:
            assert isinstance(part, Conditioner), f"configs/conditioner/{name}.yaml: {type(part).__name__}"
            checked[f"{type(part).__module__}.{type(part).__name__}"] = True
        checked[cfg._target_] = True
    assert all(checked.values()), f"no instance checked for {[t for t, ok in checked.items() if not ok]}"
