"""The EMA and the sample grid under FSDP: 2 CPU processes over gloo (``ldm.lit.sharded.FSDPStrategy``).

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
    run = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "fsdp_probe.py"), str(out), mode, *extra],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
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
def test_train_cli_fsdp_two_cpu_processes_with_ema_and_grid(tiny_data: dict, tmp_path: Path) -> None:
    """train.py trainer=fsdp on 2 CPU processes: the EMA and the sample grid on (they used to refuse FSDP)."""
    out_dir = tmp_path / "fsdp"
    args = tiny_overrides(
        tiny_data,
        out_dir,
        "trainer=fsdp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.precision=32-true",
        "trainer.max_steps=3",
        "callbacks.sample_grid.every_n_steps=2",
        "hydra.run.dir=" + str(out_dir),
    )
    run = subprocess.run(
        [sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=400
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
