"""Layer (a): every config group composes, the cheap ones instantiate, and the Hydra CLI behaves as users
expect."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from ldm.config_utils import CONFIGS, compose_config

ROOT = Path(__file__).resolve().parents[1]
GROUPS = sorted(p.name for p in Path(CONFIGS).iterdir() if p.is_dir() and p.name != "hydra")


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONFIGS) / group).glob("*.yaml"))


@pytest.mark.parametrize("group", GROUPS)
def test_every_option_composes(group: str) -> None:
    assert options(group), f"configs/{group}/ is empty"
    for option in options(group):
        cfg = compose_config("train", [f"{group}={option}"])
        assert cfg.task_name


def test_sample_config_composes() -> None:
    for option in options("sampler"):
        cfg = compose_config("sample", ["ckpt=x.ckpt", f"sampler={option}"])
        assert callable(instantiate(cfg.sampler))


def test_cheap_groups_instantiate() -> None:
    cfg = compose_config("train", ["net=unet_tiny", "diffusion=ddpm_scaled_linear_v"])
    net = instantiate(cfg.net)
    assert net.in_channels == 4 and net.context_dim == 384
    schedule = instantiate(cfg.diffusion.schedule)
    loss = instantiate(cfg.diffusion.loss)
    assert loss.prediction == "v" and torch.allclose(loss.schedule.alphas_cumprod, schedule.alphas_cumprod)
    optimizer = instantiate(cfg.optim)(net.parameters())
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["lr"] == cfg.optim.lr
    for option in options("lr_schedule"):
        c = compose_config("train", [f"lr_schedule={option}"])
        scheduler = instantiate(c.lr_schedule)(optimizer)
        assert scheduler.get_last_lr()[0] > 0


def test_experiments_are_override_only() -> None:
    """Presets only override: every key they set already exists in the default config."""
    from omegaconf import OmegaConf

    for option in options("experiment"):
        text = (Path(CONFIGS) / "experiment" / f"{option}.yaml").read_text()
        assert text.startswith("# @package _global_") or "\n# @package _global_" in text
        node = OmegaConf.load(Path(CONFIGS) / "experiment" / f"{option}.yaml")
        for entry in node.get("defaults", []):
            assert str(next(iter(entry))).startswith("override /"), f"{option}: {entry} is not an override"
        base = compose_config("train", [])
        for key in node:
            if key != "defaults":
                assert key in base, (
                    f"experiment {option} sets '{key}', which the default config does not have"
                )


def run_cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_help_and_cfg_job() -> None:
    out = run_cli("train.py", "--help")
    nets = ", ".join(sorted(p.stem for p in (ROOT / "configs" / "net").glob("*.yaml")))  # every option listed
    assert out.returncode == 0 and f"net: {nets}" in out.stdout
    out = run_cli("train.py", "--cfg", "job", "optim.lr=1e-4")
    assert out.returncode == 0 and "lr: 0.0001" in out.stdout and "_target_: ldm.nets.unet.UNet" in out.stdout


def test_override_that_names_no_option_fails_with_the_fix() -> None:
    out = run_cli("train.py", "optim.lrr=1e-4")
    assert out.returncode != 0 and "Could not override 'optim.lrr'" in out.stderr
    out = run_cli("train.py", "net=unet_huge")
    assert (
        out.returncode != 0 and "Could not find 'net/unet_huge'" in out.stderr and "unet_small" in out.stderr
    )
