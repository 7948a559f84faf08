"""FID/KID during training: at a fixed interval and at the last step, logged as eval/*, recorded with their
settings, the reference statistics cached once beside the validation shards and reused."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import tiny_overrides

import train
from ldm.config_utils import compose_config

QUALITY = [
    "callbacks.sample_quality.extractor=tiny",
    "callbacks.sample_quality.num_samples=8",
    "callbacks.sample_quality.batch_size=4",
    "callbacks.sample_quality.every_n_steps=3",
    "callbacks.sample_quality.steps=3",
    "callbacks.sample_quality.kid_subsets=5",
]


def _overrides(tiny_data: dict, out: Path, *extra: str) -> list[str]:
    base = [o for o in tiny_overrides(tiny_data, out) if o != "callbacks.sample_quality=null"]
    return [*base, *QUALITY, *extra]


def test_fid_is_logged_every_n_steps_and_at_the_end(tiny_data: dict, tmp_path: Path) -> None:
    out = tmp_path / "run"
    summary = train.run(compose_config("train", _overrides(tiny_data, out)))
    lines = [json.loads(line) for line in (out / "eval_during_training.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [3, 6]
    for record in lines:
        assert record["n"] == 8 and record["extractor"] == "tiny" and record["steps"] == 3
        assert (
            record["sampler"] == "sample_euler_ancestral"
            and record["use_ema"] is True
            and record["cfg_scale"] == 3.0
        )
        assert math.isfinite(record["fid"]) and record["fid"] > 0 and math.isfinite(record["kid"])
    assert summary["metrics"]["eval/fid"] == pytest.approx(
        lines[-1]["fid"], rel=1e-6
    )  # callback_metrics: monitors and sweeps see it
    caches = list(Path(tiny_data["latents"]).glob("ref_stats_*.npz"))
    assert len(caches) == 1 and lines[0]["ref_n"] == 6  # the tiny val shard's 6 latents, decoded

    again = train.run(
        compose_config("train", _overrides(tiny_data, tmp_path / "again", "trainer.max_steps=3"))
    )
    assert list(Path(tiny_data["latents"]).glob("ref_stats_*.npz")) == caches  # reused, not recomputed
    assert again["metrics"]["eval/fid"] == pytest.approx(
        lines[0]["fid"], rel=1e-6
    )  # same weights, prompts and seeds: the same FID
