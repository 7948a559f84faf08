"""eval.py end to end on the tiny data with the tiny extractor: one checkpoint over two CFG scales (+ CLIP),
resume without new work, a run directory scored per step, the reference cache refused under other shards."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_overrides
from test_evaluation_clip import save_tiny_clip

import eval as eval_py
import train
from ldm.config_utils import compose_config


@pytest.fixture(scope="module")
def run_dir(tiny_data: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("eval_run") / "run"
    train.run(
        compose_config("train", tiny_overrides(tiny_data, out))
    )  # checkpoints at steps 3 and 6 (+ last)
    return out


def eval_cfg(ckpt: Path, out_dir: Path, *extra: str):
    return compose_config(
        "eval",
        [
            f"ckpt={ckpt}",
            f"out_dir={out_dir}",
            "num_samples=6",
            "batch_size=4",
            "steps=3",
            "cfg_scale=[1,4]",
            "extractor=tiny",
            "progress=false",
            "kid_subsets=5",
            "save_grid=4",
            *extra,
        ],
    )


class Calls:
    """Wraps eval.py's generate / load_for_sampling, counting calls (and the prompts and seeds asked for)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.generate: list[tuple[list[str], list[int], float]] = []
        self.loads: list[Path] = []
        real_generate, real_load = eval_py.generate, eval_py.load_for_sampling

        def generate(*args, **kwargs):
            self.generate.append((list(args[3]), list(kwargs["seeds"]), kwargs["cfg_scale"]))
            return real_generate(*args, **kwargs)

        def load(path, *args, **kwargs):
            self.loads.append(Path(path))
            return real_load(path, *args, **kwargs)

        monkeypatch.setattr(eval_py, "generate", generate)
        monkeypatch.setattr(eval_py, "load_for_sampling", load)


def val_captions(tiny_data: dict) -> list[str]:
    from ldm.data.shards import SkipCounter
    from ldm.data.tar_reader import raw_samples

    return [
        r["txt"].decode() for r in raw_samples([str(tiny_data["latents"] / "val-000000.tar")], SkipCounter())
    ]


def test_one_checkpoint_with_clip_then_resume(
    run_dir: Path, tiny_data: dict, tmp_path: Path, monkeypatch
) -> None:
    ckpt, out = run_dir / "checkpoints" / "step_000006.ckpt", tmp_path / "eval"
    clip = save_tiny_clip(tmp_path / "clip")
    calls = Calls(monkeypatch)
    records = eval_py.run(eval_cfg(ckpt, out, f"clip_model={clip}"))
    assert [(r["step"], r["cfg_scale"]) for r in records] == [(6, 1.0), (6, 4.0)]
    captions = val_captions(tiny_data)  # the prompts: the validation captions in order, cycled; seeds 0..5
    assert [c[:2] for c in calls.generate] == [
        (captions[:4], [0, 1, 2, 3]),
        ((captions * 2)[4:6], [4, 5]),
    ] * 2
    for r in records:
        assert (
            r["n"] == 6
            and r["sampler"] == "euler_ancestral"
            and r["steps"] == 3
            and r["seed"] == 0
            and r["use_ema"]
        )
        assert (
            r["ref_n"] == len(captions)
            and r["extractor"] == "tiny"
            and r["checkpoint"] == str(ckpt.resolve())
        )
        assert np.isfinite([r["fid"], r["kid"], r["kid_std"]]).all() and r["fid"] > 0
        assert 0 <= r["clip_score"] <= 100 and r["clip_model"] == str(clip)
    assert json.loads((out / "eval.json").read_text())["points"] == records
    rows = list(csv.DictReader(open(out / "eval.csv")))
    assert [(r["step"], r["cfg_scale"], r["n"]) for r in rows] == [("6", "1.0", "6"), ("6", "4.0", "6")]
    for name in (
        "fid_vs_cfg.png",
        "fid_vs_clip.png",
        "ref_stats.npz",
        "grid_step6_cfg1.png",
        "grid_step6_cfg4.png",
    ):
        assert (out / name).is_file(), name
    # resume: every point is in eval.json, so nothing is loaded, generated or scored again
    calls.generate.clear()
    again = eval_py.run(eval_cfg(ckpt, out, f"clip_model={clip}"))
    assert again == records and calls.generate == [] and calls.loads == [ckpt]


def test_run_directory_scores_each_step_once(run_dir: Path, tmp_path: Path, monkeypatch) -> None:
    calls = Calls(monkeypatch)
    out, ref = (
        tmp_path / "new" / "eval",
        f"ref_stats={tmp_path / 'ref.npz'}",
    )  # out_dir made by eval.py itself
    records = eval_py.run(eval_cfg(run_dir, out, ref))
    assert [(r["step"], r["cfg_scale"]) for r in records] == [(3, 1.0), (3, 4.0), (6, 1.0), (6, 4.0)]
    assert [p.name for p in calls.loads] == [
        "step_000003.ckpt",
        "step_000006.ckpt",
    ]  # last.ckpt is step 6 again
    assert len(calls.generate) == 8  # 2 checkpoints x 2 scales x 2 batches
    assert (out / "fid_vs_step.png").is_file() and (out / "grid_step3_cfg1.png").is_file()
    assert records[0]["fid"] != records[2]["fid"]  # other weights, other images
    calls.generate.clear()
    calls.loads.clear()
    # a third scale later: only the new points are computed
    more = eval_py.run(eval_cfg(run_dir, out, ref, "cfg_scale=[1,4,7]"))
    assert [(r["step"], r["cfg_scale"]) for r in more if r["cfg_scale"] == 7.0] == [(3, 7.0), (6, 7.0)]
    assert {c[2] for c in calls.generate} == {7.0} and len(more) == 6


def test_reference_cache_refused_for_other_shards(run_dir: Path, tiny_data: dict, tmp_path: Path) -> None:
    ckpt, out = run_dir / "checkpoints" / "last.ckpt", tmp_path / "eval"
    eval_py.run(
        eval_cfg(ckpt, out, "cfg_scale=3")
    )  # reference from the latent val shards (decoded by the AE)
    images = f"shards={tiny_data['images'] / 'val-000000.tar'}"
    with pytest.raises(
        ValueError, match=r"ref_stats.npz' were computed with other shards, source .*delete the file"
    ):
        eval_py.run(eval_cfg(ckpt, out, "cfg_scale=3", images))
    records = eval_py.run(eval_cfg(ckpt, out, "cfg_scale=3", images, f"ref_stats={tmp_path / 'images.npz'}"))
    assert len(records) == 1 and records[0]["shards"].endswith("images/val-000000.tar")
    stored = np.load(tmp_path / "images.npz")
    assert json.loads(str(stored["identity"]))["source"]["kind"] == "images"


@pytest.mark.parametrize(
    ("override", "error", "match"),
    [
        ("cfg_scale=[1,x]", ValueError, "cfg_scale=.* must be a number or a list"),
        ("num_samples=1", ValueError, "FID needs at least 2 images"),
        ("extractor=nope", ValueError, "extractor='nope' is unknown"),
    ],
)
def test_bad_arguments(run_dir: Path, tmp_path: Path, override: str, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        eval_py.run(eval_cfg(run_dir / "checkpoints" / "last.ckpt", tmp_path / "o", override))


def test_empty_run_directory(tmp_path: Path) -> None:
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no \\*.ckpt in .*pass ckpt=RUN_DIR"):
        eval_py.run(eval_cfg(tmp_path / "run", tmp_path / "o"))
