"""A checkpoint's stored config never runs code: every `_target_` it names must be on the project's
allowlist."""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import ROOT, tiny_overrides

import sample
import train
from ldm.config_utils import compose_config
from ldm.safe_config import (
    ALLOWED_TARGETS,
    SAMPLING_TARGETS,
    TRUST_FLAG,
    UntrustedConfigError,
    check_config,
)


@pytest.fixture(scope="module")
def good_ckpt(tiny_data: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("trust") / "run"
    train.run(compose_config("train", tiny_overrides(tiny_data, out, "trainer.max_steps=2")))
    return out / "checkpoints" / "last.ckpt"


def write_text(marker: Path, data: str = "") -> dict[str, Any]:
    """Path(marker).write_text(data) -> len(data): a file write that fits any int/float argument, so sampling
    with the payload in e.g. net.dropout still exits 0. (Hydra blocks os.system & co.; it does not block
    this.)"""
    return {
        "_target_": "pathlib.Path.write_text",
        "self": {"_target_": "pathlib.Path", "_args_": [str(marker)]},
        "data": data,
    }


def set_at(config: dict, path: str, value: Any) -> None:
    *parents, last = path.split(".")
    node = config
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value


WRITE = "pathlib.Path.write_text"
# name: (where the payload goes, payload(marker), the target the error names, the config path it names)
PAYLOADS = {
    "top_level_model_node": ("model.conditioner", write_text, WRITE, "model.conditioner"),
    "nested_argument": ("model.denoiser.net.dropout", write_text, WRITE, "model.denoiser.net.dropout"),
    "unknown_argument": ("model.autoencoder.extra", write_text, WRITE, "model.autoencoder.extra"),
    "list_element": (
        "model.denoiser.net.channel_mult.0",
        lambda m: write_text(m, "x"),
        WRITE,
        r"model.denoiser.net.channel_mult\[0\]",
    ),
    "sampler_node": ("sampler", write_text, WRITE, "sampler"),
    "inside_partial_sampler": ("sampler.order", lambda m: write_text(m, "xx"), WRITE, "sampler.order"),
    "partial_target": ("sampler", lambda m: {**write_text(m), "_partial_": True}, WRITE, "sampler"),
    "inside_args": (
        "model.denoiser.schedule._args_",
        lambda m: [write_text(m)],
        WRITE,
        r"model.denoiser.schedule._args_\[0\]",
    ),
    "hydra_blocklisted_too": (
        "model.denoiser.net.dropout",
        lambda m: {"_target_": "os.system", "_args_": [f"touch {m}"]},
        "os.system",
        "model.denoiser.net.dropout",
    ),
}


def evil_checkpoint(good: Path, tmp_path: Path, where: str, payload: Any) -> Path:
    ckpt = torch.load(good, map_location="cpu", weights_only=True)
    ckpt["ldm_config"] = copy.deepcopy(ckpt["ldm_config"])
    set_at(ckpt["ldm_config"], where, payload)
    path = tmp_path / "evil.ckpt"
    torch.save(ckpt, path)
    return path


def sample_cfg(ckpt: Path, out_dir: Path, *extra: str):
    return compose_config(
        "sample",
        [f"ckpt={ckpt}", f"out_dir={out_dir}", "prompt=red apple", "num_images=1", "steps=2", *extra],
    )


@pytest.mark.parametrize("name", sorted(PAYLOADS))
def test_checkpoint_payload_is_refused_and_never_runs(name: str, good_ckpt: Path, tmp_path: Path) -> None:
    where, make, target, config_path = PAYLOADS[name]
    marker = tmp_path / "marker"
    ckpt = evil_checkpoint(good_ckpt, tmp_path, where, make(marker))
    with pytest.raises(
        UntrustedConfigError, match=rf"'{target}' at {config_path}(?![\w.\[]).*trust_checkpoint_config=true"
    ) as err:
        sample.run(sample_cfg(ckpt, tmp_path / "out"))
    assert "\n" not in str(err.value)
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


def test_interpolation_that_would_build_a_node_is_refused(good_ckpt: Path, tmp_path: Path) -> None:
    """${oc.create:...} would turn a string into a `_target_` node after the check: stored configs are
    resolved."""
    marker = tmp_path / "marker"
    payload = (
        "${oc.create:{_target_: pathlib.Path.write_text, self: {_target_: pathlib.Path, _args_: ['"
        + str(marker)
        + "']}, data: ''}}"
    )
    ckpt = evil_checkpoint(good_ckpt, tmp_path, "model.denoiser.net.dropout", payload)
    with pytest.raises(UntrustedConfigError, match=r"interpolation .* at model.denoiser.net.dropout"):
        sample.run(sample_cfg(ckpt, tmp_path / "out"))
    assert not marker.exists()


def test_unknown_special_key_is_refused() -> None:
    with pytest.raises(UntrustedConfigError, match=r"unknown special key '_call_' at net._call_"):
        check_config({"net": {"_target_": "ldm.nets.unet.UNet", "_call_": "x"}}, SAMPLING_TARGETS)
    with pytest.raises(UntrustedConfigError, match=r"_target_ that must be a string, got dict at net"):
        check_config({"net": {"_target_": {"a": 1}}}, SAMPLING_TARGETS)


def test_project_helpers_outside_the_allowlist_are_refused() -> None:
    """Being under `ldm.` is not enough: helpers that write files are not constructors a config may name."""
    node = {"_target_": "ldm.autoencoder.loaders.save_kl_autoencoder", "path": "/tmp/x"}
    with pytest.raises(UntrustedConfigError, match="save_kl_autoencoder"):
        check_config({"autoencoder": node}, ALLOWED_TARGETS)
    # training-only targets (trainer, loggers, callbacks) are not built by sampling
    with pytest.raises(UntrustedConfigError, match="lightning.Trainer"):
        check_config({"model": {"denoiser": {"_target_": "lightning.Trainer"}}}, SAMPLING_TARGETS)


def test_trust_flag_builds_an_unlisted_target_after_a_warning(
    good_ckpt: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """trust_checkpoint_config=true: the checkpoint's own config is built as stored (here an OrderedDict)."""
    ckpt = evil_checkpoint(
        good_ckpt, tmp_path, "sampler.eta", {"_target_": "collections.OrderedDict", "_args_": [[]]}
    )
    with pytest.raises(UntrustedConfigError, match="collections.OrderedDict"):
        sample.run(sample_cfg(ckpt, tmp_path / "refused"))
    built: list[Any] = []

    def spy(*args: Any, **kwargs: Any) -> torch.Tensor:  # the stored sampler is built; don't run it
        built.append(kwargs["sampler"].keywords["eta"])
        return torch.zeros(len(args[3]), 3, 32, 32)

    with caplog.at_level(logging.WARNING), pytest.MonkeyPatch.context() as mp:
        mp.setattr(sample, "generate", spy)
        sample.run(sample_cfg(ckpt, tmp_path / "trusted", f"{TRUST_FLAG}=true"))
    assert built and type(built[0]).__name__ == "OrderedDict"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("trust_checkpoint_config=true" in w and "run any code" in w for w in warnings)


def config_targets() -> set[str]:
    """Every `_target_` value in configs/**/*.yaml."""
    found: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("_target_"), str):
                found.add(node["_target_"])
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    for path in (ROOT / "configs").rglob("*.yaml"):
        walk(yaml.safe_load(path.read_text()))
    return found


def test_allowlist_is_exactly_the_targets_of_the_configs() -> None:
    """A new config `_target_` fails here until it is allowlisted in ldm/safe_config.py (and stale ones
    too)."""
    targets = config_targets()
    assert len(targets) > 30
    assert targets - ALLOWED_TARGETS == set(), "add these to ldm/safe_config.py"
    assert ALLOWED_TARGETS - targets == set(), "no config uses these: remove them from ldm/safe_config.py"
    assert SAMPLING_TARGETS <= ALLOWED_TARGETS


EXPERIMENTS = [p.stem for p in (ROOT / "configs" / "experiment").glob("*.yaml")]


@pytest.mark.parametrize("experiment", [None, *sorted(EXPERIMENTS)])
def test_every_experiment_stores_a_config_that_passes_the_check(experiment: str | None) -> None:
    """The model and sampler nodes a run stores (resolved, as train.py does) pass the sampling allowlist."""
    from omegaconf import OmegaConf

    overrides = [f"experiment={experiment}"] if experiment else []
    if experiment == "finetune_sd":  # its one mandatory value: the pipeline directory
        overrides.append("paths.pretrained_pipeline=/models/sd15")
    cfg = compose_config(
        "train",
        [*overrides, "autoencoder.path=/x.safetensors"]
        if experiment in (None, "edm", "rectified_flow")
        else overrides,
    )
    stored = OmegaConf.to_container(cfg, resolve=True)
    model = stored["model"]
    nodes = {k: model[k] for k in ("denoiser", "conditioner", "autoencoder") if k in model}
    if "denoiser" in nodes:
        nodes["sampler"] = stored["sampler"]
    check_config(nodes, SAMPLING_TARGETS)
