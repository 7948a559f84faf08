"""End-to-end: shards -> train -> checkpoint (EMA, config, no frozen weights) -> resume -> sample."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_overrides
from PIL import Image

import sample
import train
from ldm.config_utils import compose_config
from ldm.lit.checkpoint_io import load_checkpoint_file
from ldm.sampling.registry import samplers_for


def read_losses(run_dir: Path) -> dict[int, float]:
    rows = list(csv.DictReader(open(run_dir / "csv" / "metrics.csv")))
    return {int(r["step"]): float(r["train/loss"]) for r in rows if r.get("train/loss")}


@pytest.fixture(scope="module")
def trained_run(tiny_data: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run") / "run"
    cfg = compose_config("train", tiny_overrides(tiny_data, out, "callbacks.sample_grid.every_n_steps=3"))
    summary = train.run(cfg)
    assert summary["global_step"] == 6
    return out


def test_checkpoint_contents(trained_run: Path) -> None:
    ckpt = load_checkpoint_file(trained_run / "checkpoints" / "last.ckpt")  # weights_only=True
    assert ckpt["global_step"] == 6
    assert ckpt["ldm_config"]["model"]["denoiser"]["net"]["_target_"] == "ldm.nets.unet.UNet"
    ema, state = ckpt["ema_state_dict"], ckpt["state_dict"]
    net_keys = {k.removeprefix("denoiser.net.") for k in state if k.startswith("denoiser.net.")}
    assert set(ema) == net_keys
    # the frozen text encoder and autoencoder are rebuilt from their own weights, not stored in every
    # checkpoint
    assert not any(k.startswith(("autoencoder.", "conditioner.")) for k in state)
    # EMA lags the trained weights: close but not equal after a few steps
    diffs = [
        (ema[k] - state["denoiser.net." + k]).abs().max().item() for k in ema if ema[k].is_floating_point()
    ]
    assert max(diffs) > 0
    assert "optimizer_states" in ckpt and "lr_schedulers" in ckpt and "rng_states" in ckpt
    assert not list((trained_run / "checkpoints").glob("*.tmp")), "atomic writes leave no temporary files"


def test_run_directory(trained_run: Path) -> None:
    assert (trained_run / "config_resolved.yaml").is_file()
    assert sorted(p.name for p in (trained_run / "samples").glob("*.png")) == [
        "step_000003.png",
        "step_000006.png",
    ]
    losses = read_losses(trained_run)
    assert sorted(losses) == list(range(6)) and all(v > 0 for v in losses.values())
    header = open(trained_run / "csv" / "metrics.csv").readline()
    assert "train/samples_per_sec" in header and "lr-AdamW" in header
    summary = json.loads((trained_run / "summary.json").read_text())
    assert summary["global_step"] == 6


def sample_cfg(ckpt: Path, out_dir: Path, *extra: str):
    return compose_config(
        "sample",
        [
            f"ckpt={ckpt}",
            f"out_dir={out_dir}",
            "prompt=red apple",
            "num_images=3",
            "steps=5",
            "cfg_scale=3",
            "seed=7",
            "negative_prompt=blurry",
            *extra,
        ],
    )


def test_sample_writes_images_grid_metadata_and_is_deterministic(trained_run: Path, tmp_path: Path) -> None:
    ckpt = trained_run / "checkpoints" / "last.ckpt"
    records = sample.run(sample_cfg(ckpt, tmp_path / "a"))
    sample.run(sample_cfg(ckpt, tmp_path / "b"))
    assert [r["seed"] for r in records] == [7, 8, 9]
    for r in records:
        a, b = (tmp_path / d / r["file"] for d in "ab")
        assert a.read_bytes() == b.read_bytes()  # same seed -> byte-identical PNG
        assert r["prompt"] == "red apple" and r["negative_prompt"] == "blurry" and r["steps"] == 5
        assert (
            r["cfg_scale"] == 3
            and r["sampler"]["_target_"].endswith("sample_euler_ancestral")
            and r["use_ema"] is True
        )
        assert r["checkpoint"] == str(ckpt.resolve())
    meta = json.loads((tmp_path / "a" / "metadata.json").read_text())
    assert meta["images"] == records
    assert (tmp_path / "a" / "grid.png").is_file()
    # a different seed gives different images; the raw (non-EMA) weights give different images
    other = sample.run(sample_cfg(ckpt, tmp_path / "c", "seed=100"))
    assert (tmp_path / "c" / other[0]["file"]).read_bytes() != (
        tmp_path / "a" / records[0]["file"]
    ).read_bytes()
    raw = sample.run(sample_cfg(ckpt, tmp_path / "d", "use_ema=false"))
    assert (tmp_path / "d" / raw[0]["file"]).read_bytes() != (
        tmp_path / "a" / records[0]["file"]
    ).read_bytes()


def test_prompts_file_and_ddpm_sampler(trained_run: Path, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("red apple\n\nblue heart\n")
    cfg = compose_config(
        "sample",
        [
            f"ckpt={trained_run / 'checkpoints' / 'last.ckpt'}",
            f"out_dir={tmp_path / 'o'}",
            f"prompts_file={prompts}",
            "num_images=2",
            "steps=4",
            "sampler=ddpm",
        ],
    )
    records = sample.run(cfg)
    assert [r["prompt"] for r in records] == ["red apple", "red apple", "blue heart", "blue heart"]


SAMPLERS = sorted(samplers_for("ve"))  # every registered sampler for this VP model


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_every_sampler_and_guidance_option_from_sample_py(
    sampler: str, trained_run: Path, tmp_path: Path, monkeypatch
) -> None:
    import ldm.generate

    seen: list[dict] = []

    class RecordingCFG(ldm.generate.CFGDenoiser):  # the guidance options must reach the guided denoiser
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            seen.append({"scale": self.scale, "rescale": self.rescale, "interval": self.interval})

    monkeypatch.setattr(ldm.generate, "CFGDenoiser", RecordingCFG)
    ckpt = trained_run / "checkpoints" / "last.ckpt"
    spacing = "karras" if sampler in ("euler", "heun", "dpmpp_2m") else "leading"
    extra = [
        f"sampler={sampler}",
        f"spacing={spacing}",
        "guidance_rescale=0.7",
        "guidance_interval=[0.5,20.0]",
    ]
    records = sample.run(sample_cfg(ckpt, tmp_path / "o", *extra))
    assert (
        records[0]["sampler"]["_target_"].endswith(f"sample_{sampler}") and records[0]["spacing"] == spacing
    )
    assert records[0]["guidance_rescale"] == 0.7 and records[0]["guidance_interval"] == [0.5, 20.0]
    assert seen == [{"scale": 3.0, "rescale": 0.7, "interval": (0.5, 20.0)}]
    image = np.asarray(Image.open(tmp_path / "o" / records[0]["file"]))
    assert image.shape == (32, 32, 3) and image.std() > 0


def test_missing_checkpoint_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="checkpoint not found: .*pass ckpt=PATH"):
        sample.run(sample_cfg(tmp_path / "nope.ckpt", tmp_path / "o"))


def test_resume_continues_the_loss_curve(tiny_data: dict, tmp_path: Path) -> None:
    """Two epochs in one go == one epoch, checkpoint, resume for the second (same losses, same weights)."""
    base = ["trainer.max_steps=-1", "data.train_samples=64", "trainer.check_val_every_n_epoch=100"]
    full = compose_config(
        "train", tiny_overrides(tiny_data, tmp_path / "full", *base, "trainer.max_epochs=2")
    )
    train.run(full)
    first = compose_config(
        "train", tiny_overrides(tiny_data, tmp_path / "first", *base, "trainer.max_epochs=1")
    )
    train.run(first)
    ckpt = tmp_path / "first" / "checkpoints" / "last.ckpt"
    resumed = compose_config(
        "train",
        tiny_overrides(tiny_data, tmp_path / "resumed", *base, "trainer.max_epochs=2", f"ckpt_path={ckpt}"),
    )
    train.run(resumed)
    full_losses, resumed_losses = read_losses(tmp_path / "full"), read_losses(tmp_path / "resumed")
    assert sorted(full_losses) == list(range(8)) and sorted(resumed_losses) == [4, 5, 6, 7]
    for step, loss in resumed_losses.items():
        assert loss == pytest.approx(full_losses[step], rel=1e-5, abs=1e-7)
    a = load_checkpoint_file(tmp_path / "full" / "checkpoints" / "last.ckpt")
    b = load_checkpoint_file(tmp_path / "resumed" / "checkpoints" / "last.ckpt")
    for k, v in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][k], v, rtol=1e-5, atol=1e-6)
    for k, v in a["ema_state_dict"].items():
        torch.testing.assert_close(b["ema_state_dict"][k], v, rtol=1e-5, atol=1e-6)


def test_wandb_offline_and_tensorboard_loggers(tiny_data: dict, tmp_path: Path, monkeypatch) -> None:
    """Not logged in -> wandb runs offline into a real run directory; TensorBoard gets scalars and the sample
    grid."""
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no_netrc"))
    out = tmp_path / "r"
    cfg = compose_config(
        "train",
        tiny_overrides(
            tiny_data,
            out,
            "logger=[wandb,tensorboard]",
            "trainer.max_steps=2",
            "callbacks.sample_grid.every_n_steps=2",
        ),
    )
    train.run(cfg)
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    events = list((out / "tensorboard").rglob("events.out.tfevents.*"))
    assert events
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    assert "train/loss" in acc.Tags()["scalars"] and "samples" in acc.Tags()["images"]


def test_fast_dev_run(tiny_data: dict, tmp_path: Path) -> None:
    out = tmp_path / "r"
    summary = train.run(compose_config("train", tiny_overrides(tiny_data, out, "debug=fast_dev_run")))
    assert summary["global_step"] == 1
    assert not (out / "csv").exists()  # fast_dev_run switches the loggers off


@pytest.mark.slow
def test_overfits_a_small_subset(tiny_data: dict, tmp_path: Path) -> None:
    """debug=overfit: 64 samples, 300 steps; the training loss must fall well below where it started."""
    out = tmp_path / "r"
    train.run(
        compose_config("train", tiny_overrides(tiny_data, out, "debug=overfit", "trainer.max_steps=300"))
    )
    losses = read_losses(out)
    first, last = sum(losses[s] for s in range(10)) / 10, sum(losses[s] for s in range(290, 300)) / 10
    assert last < 0.6 * first, (first, last)
