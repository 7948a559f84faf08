"""Every objective trains and samples end to end through the entry points; samplers that do not fit a
schedule's coordinates are refused with the fix in the message."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import tiny_overrides

import sample
import train
from ldm.config_utils import compose_config
from ldm.diffusion import DiscreteSchedule, EDMSchedule, FlowSchedule
from ldm.sampling import sample_ddim, sample_flow_euler, sample_heun
from ldm.sampling.grids import sampling_sigmas
from ldm.sampling.registry import check_sampler

OBJECTIVES = {
    "edm": ["experiment=edm"],
    "rectified_flow": ["experiment=rectified_flow"],
    "zero_snr_v_min_snr": [
        "diffusion=sd_zero_snr_v",
        "diffusion/weighting=min_snr",
        "callbacks.sample_grid.spacing=trailing",
        "callbacks.sample_grid.guidance_rescale=0.7",
    ],
    "cosine_x0_tricks": [
        "diffusion=ddpm_cosine_eps",
        "diffusion.prediction=x0",
        "diffusion.offset_noise=0.1",
        "diffusion.input_perturbation=0.1",
        "diffusion/timesteps=logit_normal",
    ],
}


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_objective_trains_and_samples(name: str, tiny_data: dict, tmp_path: Path) -> None:
    out = tmp_path / name
    cfg = compose_config("train", tiny_overrides(tiny_data, out, "trainer.max_steps=3", *OBJECTIVES[name]))
    summary = train.run(cfg)
    assert summary["global_step"] == 3 and math.isfinite(summary["metrics"]["train/loss"])
    assert (
        out / "samples" / "step_000003.png"
    ).is_file()  # the end-of-training grid used the matching sampler
    records = sample.run(
        compose_config(
            "sample",
            [
                f"ckpt={out / 'checkpoints' / 'last.ckpt'}",
                f"out_dir={tmp_path / 's'}",
                "prompt=red apple",
                "num_images=2",
                "steps=4",
            ],
        )
    )
    assert len(records) == 2 and (tmp_path / "s" / records[0]["file"]).is_file()
    assert records[0]["sampler"]["_target_"] == cfg.sampler._target_  # default: the training grid's sampler


def test_flow_model_refuses_ve_samplers_before_training(tiny_data: dict, tmp_path: Path) -> None:
    cfg = compose_config("train", tiny_overrides(tiny_data, tmp_path / "r", "diffusion=rectified_flow"))
    with pytest.raises(ValueError, match="rectified flow: use sampler=flow_euler"):
        train.run(cfg)


def test_sampling_grids_and_sampler_checks() -> None:
    vp, edm, flow = DiscreteSchedule(), EDMSchedule(), FlowSchedule(shift=3.0)
    assert torch.equal(sampling_sigmas(vp, 10), sampling_sigmas(vp, 10, "trailing"))
    karras = sampling_sigmas(vp, 10, "karras")
    assert float(karras[0]) == pytest.approx(vp.sigma_max, rel=1e-6)
    assert float(karras[-2]) == pytest.approx(vp.sigma_min, rel=1e-5) and float(karras[-1]) == 0.0
    e = sampling_sigmas(edm, 18)
    assert float(e[0]) == pytest.approx(80.0) and float(e[-2]) == pytest.approx(0.002)
    f = sampling_sigmas(flow, 8)
    assert float(f[0]) == 1.0 and float(f[-1]) == 0.0 and bool((f[1:] < f[:-1]).all())
    with pytest.raises(ValueError, match="spacing=karras"):
        sampling_sigmas(edm, 10, "leading")
    with pytest.raises(ValueError, match="spacing must be one of"):
        sampling_sigmas(vp, 10, "flow")
    check_sampler(sample_heun, edm)
    with pytest.raises(ValueError, match="use sampler=flow_euler"):
        check_sampler(sample_ddim, flow)
    with pytest.raises(ValueError, match="is for rectified-flow models"):
        check_sampler(sample_flow_euler, vp)
