"""The validation loss per noise level: fixed levels reach the loss, and training logs one curve point per
level."""

from __future__ import annotations

import csv
from pathlib import Path

import torch
from conftest import tiny_overrides

import train
from ldm.config_utils import compose_config
from ldm.diffusion.denoiser import append_dims
from ldm.diffusion.loss import DiffusionLoss
from ldm.diffusion.schedules import DiscreteSchedule


def test_fixed_sigma_per_sample_loss_matches_the_formula() -> None:
    schedule = DiscreteSchedule(beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
    loss = DiffusionLoss(schedule, prediction="eps")
    net = lambda x, c_noise, context=None, context_mask=None: 0.5 * x  # noqa: E731 - a fixed, input-dependent "net"
    x0 = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    sigma = schedule.sigma_at_fraction(torch.tensor([0.05, 0.35, 0.65, 0.95], dtype=torch.float64))
    got = loss(net, x0, generator=torch.Generator().manual_seed(1), sigma=sigma, reduce=False)  # (4,)
    _, alpha, s = schedule.coefficients(sigma)
    a, b = (append_dims(c, 4).float() for c in (alpha, s))  # (4, 1, 1, 1)
    # the draw consumes the generator for sigma first: redo it the same way for the expected eps
    g = torch.Generator().manual_seed(1)
    loss.timesteps(schedule, 4, g, torch.device("cpu"))
    eps = torch.randn(x0.shape, generator=g)
    expected = (0.5 * (a * x0 + b * eps) - eps).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert got[0] > got[3]  # eps is hardest to see under little noise: the loss falls with the level here


def test_training_logs_the_loss_of_every_level(tiny_data: dict, tmp_path: Path) -> None:
    out = tmp_path / "run"
    cfg = compose_config(
        "train",
        tiny_overrides(
            tiny_data, out, "trainer.check_val_every_n_epoch=1", "data.train_samples=48", "model.val_levels=5"
        ),
    )
    summary = train.run(cfg)
    levels = [summary["metrics"][f"val/loss_level_{k}"] for k in range(5)]
    assert all(v > 0 and v == v for v in levels)
    assert len(set(levels)) == 5  # distinct levels, not one value copied
    header = open(out / "csv" / "metrics.csv").readline().strip().split(",")
    assert {f"val/loss_level_{k}" for k in range(5)} <= set(header)
    rows = [r for r in csv.DictReader(open(out / "csv" / "metrics.csv")) if r.get("val/loss_level_0")]
    assert rows, "one row per validation"
