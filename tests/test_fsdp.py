"""The EMA, the sample grid, FID during training and resuming under FSDP: 2 CPU processes over gloo
(``ldm.lit.sharded.FSDPStrategy``).

Lightning refuses its own FSDPStrategy on the CPU ("The strategy `fsdp` requires a GPU accelerator") and
torch's FSDP needs ``device_id=cpu`` said explicitly ("FSDP needs a non-CPU accelerator device"); the subclass
does both.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_overrides
from torch import nn

from ldm.lit.ema import averaged_state
from ldm.lit.sharded import clean_name, local_state, local_swapped

ROOT = Path(__file__).resolve().parents[1]


def probe(out: Path, mode: str, *extra: str) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    run = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "fsdp_probe.py"), str(out), mode, *extra],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    suffix = "_resumed" if "--resume" in extra else ""
    return torch.load(out / f"result_{mode}{suffix}.pt", weights_only=False)


def test_local_state_is_the_averaged_state_without_fsdp() -> None:
    net = nn.Sequential(nn.Conv2d(2, 4, 1), nn.BatchNorm2d(4), nn.Linear(4, 4))
    net[2].requires_grad_(False)  # frozen: not averaged
    net[1].register_buffer("scratch", torch.zeros(1), persistent=False)  # not in the state dict
    assert set(local_state(net)) == set(averaged_state(net))
    assert clean_name("_fsdp_wrapped_module.net._fsdp_wrapped_module.0.weight") == "net.0.weight"
    before = {k: v.clone() for k, v in local_state(net).items()}
    with local_swapped(net, {k: torch.full_like(v, 7.0) for k, v in before.items()}):
        assert all(bool((v == 7).all()) for v in local_state(net).values())
    assert all(torch.equal(before[k], v) for k, v in local_state(net).items())


@pytest.mark.slow
def test_fsdp_ema_equals_single_process_ema(tmp_path: Path) -> None:
    """Same batches on both ranks: FSDP averages the gradients, so the weights, and the EMA each rank keeps of
    its own slices, gathered for the checkpoint, equal a single process's bit for bit; the net seen with the
    EMA swapped in and gathered (what the sample grid samples with) is that EMA."""
    single, fsdp = probe(tmp_path, "single"), probe(tmp_path, "fsdp")
    assert (
        set(fsdp["ema"])
        == set(single["ema"])
        == {"0.weight", "0.bias", "1.weight", "1.bias", "1.counter", "3.weight", "3.bias"}
    )
    for key, value in single["ema"].items():
        assert fsdp["ema"][key].shape == value.shape
        torch.testing.assert_close(fsdp["ema"][key], value, rtol=0, atol=0)
        torch.testing.assert_close(fsdp["seen"][key], value, rtol=0, atol=0)
        assert not torch.equal(value, single["weights"]["net." + key]) or key == "1.counter"
    assert fsdp["lr_schedulers"] == single["lr_schedulers"]
    assert_same_optimizer_state(fsdp["optimizer_states"][0], single["optimizer_states"][0])


def assert_same_optimizer_state(state: dict, expected: dict) -> None:
    """Equal bit for bit, AdamW's two moments distinct (on the CPU torch's FSDP used to save one buffer, the
    last state gathered, for both)."""
    assert state["param_groups"] == expected["param_groups"]
    assert set(state["state"]) == set(expected["state"]) == set(range(6))
    for key, value in expected["state"].items():
        assert not torch.equal(state["state"][key]["exp_avg"], state["state"][key]["exp_avg_sq"])
        for name, tensor in value.items():
            torch.testing.assert_close(state["state"][key][name], tensor, rtol=0, atol=0)


@pytest.mark.slow
def test_fsdp_ema_resumes_from_full_checkpoint(tmp_path: Path) -> None:
    """A resumed FSDP run slices the checkpoint's full EMA again: one more step blends the new weights into
    it."""
    probe(tmp_path, "fsdp")
    ckpt = torch.load(tmp_path / "fsdp.ckpt", weights_only=False)
    resumed = probe(tmp_path, "fsdp", "--resume", str(tmp_path / "fsdp.ckpt"), "--steps", "5")
    n = ckpt["ema_num_updates"] + 1
    weight = 1.0 - min(0.9, (1 + n) / (10 + n))
    for key, old in ckpt["ema_state_dict"].items():
        expected = old.lerp(resumed["weights"]["net." + key], weight) if old.is_floating_point() else old
        torch.testing.assert_close(resumed["ema"][key], expected)
        torch.testing.assert_close(resumed["seen"][key], resumed["ema"][key], rtol=0, atol=0)


@pytest.mark.slow
def test_fsdp_resume_equals_uninterrupted_run(tmp_path: Path) -> None:
    """3 steps, save, resume, 3 more equals 6 steps in one go, bit for bit: weights, EMA, AdamW moments and
    step counts, LR schedule. A resume only copies tensors (full state saved, sliced again on load): nothing
    is rounded, and the steps after it see the same batches and state, so no tolerance is needed. (Before
    ``FSDPStrategy.optimizer_state`` the CPU checkpoint held exp_avg_sq for exp_avg: 1.6e-2 off after 2
    steps.)"""
    probe(tmp_path / "split", "fsdp", "--steps", "3")
    resumed = probe(
        tmp_path / "split", "fsdp", "--resume", str(tmp_path / "split" / "fsdp.ckpt"), "--steps", "6"
    )
    whole = probe(tmp_path / "whole", "fsdp", "--steps", "6")
    assert resumed["global_step"] == whole["global_step"] == 6
    assert resumed["ema_num_updates"] == whole["ema_num_updates"] == 6
    assert resumed["lr_schedulers"] == whole["lr_schedulers"]
    assert whole["lr_schedulers"][0]["last_epoch"] == 6
    assert_same_optimizer_state(resumed["optimizer_states"][0], whole["optimizer_states"][0])
    for name in ("weights", "ema", "seen"):
        assert set(resumed[name]) == set(whole[name])
        for key, value in whole[name].items():
            torch.testing.assert_close(resumed[name][key], value, rtol=0, atol=0)


QUALITY = [
    "callbacks.sample_quality.extractor=tiny",
    "callbacks.sample_quality.num_samples=8",
    "callbacks.sample_quality.batch_size=2",  # 4 batches: 0 and 2 on rank 0, 1 and 3 on rank 1
    "callbacks.sample_quality.every_n_steps=3",
    "callbacks.sample_quality.steps=3",
    "callbacks.sample_quality.kid_subsets=5",
]


@pytest.mark.slow
def test_train_cli_fsdp_two_cpu_processes_with_ema_grid_and_fid(tiny_data: dict, tmp_path: Path) -> None:
    """train.py trainer=fsdp on 2 CPU processes: the EMA, the sample grid and FID during training on (they
    used to refuse FSDP, or fail on the sharded weights). The FID and KID (KID depends on the images' order)
    equal those one process computes from the run's checkpoint with the same settings."""
    out_dir = tmp_path / "fsdp"
    args = [
        *tiny_overrides(
            tiny_data,
            out_dir,
            "trainer=fsdp",
            "trainer.accelerator=cpu",
            "trainer.devices=2",
            "trainer.precision=32-true",
            "trainer.max_steps=3",
            "callbacks.sample_grid.every_n_steps=2",
        ),
        *QUALITY,
    ]
    args.remove("callbacks.sample_quality=null")
    run = subprocess.run(
        [sys.executable, "train.py", *args, "hydra.run.dir=" + str(out_dir)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads((out_dir / "summary.json").read_text())["global_step"] == 3
    assert sorted(p.name for p in (out_dir / "samples").glob("*.png")) == [
        "step_000002.png",
        "step_000003.png",
    ]
    from ldm.lit.checkpoint_io import load_checkpoint_file

    ckpt = load_checkpoint_file(out_dir / "checkpoints" / "last.ckpt")
    ema, weights = ckpt["ema_state_dict"], ckpt["state_dict"]
    assert set(ema) and all(ema[k].shape == weights["denoiser.net." + k].shape for k in ema)

    (record,) = [
        json.loads(line) for line in (out_dir / "eval_during_training.jsonl").read_text().splitlines()
    ]
    assert record["step"] == 3 and record["n"] == 8 and record["use_ema"] is True
    single, raw = single_process_quality(args, ckpt, tiny_data, tmp_path / "single")
    assert single["n"] == 8 and single["ref_n"] == record["ref_n"]
    for key in ("fid", "kid", "kid_std"):
        assert single[key] == pytest.approx(record[key], rel=1e-6, abs=1e-9), key
    # the run sampled with the EMA: the raw weights' FID is 2e-3 away (3.6249 vs 3.6269), 500x the tolerance
    assert abs(raw["fid"] - record["fid"]) > 1e-4


def single_process_quality(args: list[str], ckpt: dict, tiny_data: dict, out: Path) -> tuple[dict, dict]:
    """The sample-quality callback of ``args`` measured by one process with ``ckpt``'s EMA, and with its
    weights."""
    import lightning as L

    from ldm.config_utils import compose_config
    from ldm.instantiate import build
    from ldm.lit.ema import EMA

    cfg = compose_config("train", args)
    model, quality = build(cfg.model), build(cfg.callbacks.sample_quality)
    assert not model.load_state_dict(ckpt["state_dict"], strict=False).unexpected_keys
    ema = EMA()
    ema.shadow = dict(ckpt["ema_state_dict"])
    quality.shards = str(tiny_data["latents"] / "val-000000.tar")  # what train.py's data module gives
    trainer = L.Trainer(
        accelerator="cpu", devices=1, logger=False, callbacks=[ema, quality], default_root_dir=out
    )
    out.mkdir(parents=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each of the 2 training processes
    try:
        with_ema = quality.measure(trainer, model)
        quality.use_ema = False
        return with_ema, quality.measure(trainer, model)
    finally:
        torch.set_num_threads(threads)
