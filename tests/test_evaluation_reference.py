"""Reference statistics cache (identity kept, mismatch refused in one line) and the eval.json/csv/plot
records."""

from __future__ import annotations

import csv
import io

import numpy as np
import pytest
import torch

from ldm.evaluation import TinyFeatures, load_or_compute, load_reference
from ldm.evaluation.reference import extractor_identity, file_identity
from ldm.evaluation.results import Results, plot, point_key


def batches(n: int = 40, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return list(torch.rand(n, 3, 16, 16, generator=g).split(16))


def test_cache_round_trip_and_lazy_read(tmp_path) -> None:
    path, extractor = tmp_path / "ref.npz", TinyFeatures()
    identity = {
        "shards": [{"url": "a.tar", "size": 1, "mtime": 2}],
        "max_images": 100,
        "source": {"kind": "images"},
    }
    first = load_or_compute(path, identity, extractor, batches(), max_kid_features=30)
    assert first.n == 40 and first.features.shape == (30, 64) and first.features.dtype == np.float32
    assert first.identity["extractor"] == extractor_identity(extractor)

    def must_not_read():
        raise AssertionError("the cache should have been used")
        yield

    again = load_or_compute(path, identity, extractor, must_not_read())
    assert again.n == 40 and np.array_equal(again.stats.sigma, first.stats.sigma)
    assert np.array_equal(again.features, first.features) and again.identity == first.identity
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"shards": [{"url": "a.tar", "size": 1, "mtime": 3}]}, "shards"),  # the shard was rewritten
        ({"max_images": 50}, "max_images"),
        ({"source": {"kind": "latents"}}, "source"),
    ],
)
def test_mismatch_is_refused_naming_what_differs(tmp_path, change: dict, named: str) -> None:
    path, extractor = tmp_path / "ref.npz", TinyFeatures()
    identity = {
        "shards": [{"url": "a.tar", "size": 1, "mtime": 2}],
        "max_images": 100,
        "source": {"kind": "images"},
    }
    load_or_compute(path, identity, extractor, batches())
    with pytest.raises(
        ValueError, match=rf"computed with other {named} .*delete the file .*ref_stats=PATH"
    ) as info:
        load_or_compute(path, {**identity, **change}, extractor, batches())
    assert "\n" not in str(info.value)


def test_other_extractor_is_refused(tmp_path) -> None:
    path, identity = tmp_path / "ref.npz", {"shards": [], "max_images": 1}
    load_or_compute(path, identity, TinyFeatures(), batches())
    with pytest.raises(ValueError, match="computed with other extractor"):
        load_or_compute(path, identity, TinyFeatures(seed=1), batches())
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="cannot be read .*delete it"):
        load_reference(tmp_path / "junk.npz", identity)


def test_empty_reference_is_an_error(tmp_path) -> None:
    with pytest.raises(ValueError, match="no reference images"):
        load_or_compute(tmp_path / "r.npz", {}, TinyFeatures(), [])


def test_file_identity_follows_size_and_mtime(tmp_path) -> None:
    shard = tmp_path / "val-000000.tar"
    shard.write_bytes(b"x" * 10)
    before = file_identity(str(shard))
    assert before["size"] == 10 and before["url"] == str(shard.resolve())
    shard.write_bytes(b"x" * 11)
    assert file_identity(str(shard)) != before
    assert file_identity("s3://bucket/val-000000.tar") == {"url": "s3://bucket/val-000000.tar"}


def record(step: int, scale: float, fid: float, **extra) -> dict:
    settings = {
        "checkpoint": f"/run/step_{step}.ckpt",
        "step": step,
        "n": 8,
        "sampler": "ddim",
        "steps": 4,
        "seed": 0,
        "use_ema": True,
    }
    return {
        **settings,
        "cfg_scale": scale,
        "fid": fid,
        "kid": fid / 100,
        "kid_std": 0.0,
        "clip_score": None,
        "ref_n": 10,
        "sample_seconds": 1.0,
        "score_seconds": 0.5,
        **extra,
    }


def test_results_resume_keys_csv_and_plots(tmp_path) -> None:
    results = Results(tmp_path)
    results.add(record(3, 1.0, 50.0))
    results.add(record(3, 3.0, 40.0))
    results.add(record(6, 1.0, 30.0))
    reopened = Results(tmp_path)
    assert reopened.done(record(3, 3.0, fid=0.0))  # the measurement is not part of the key
    assert not reopened.done(record(3, 5.0, fid=0.0))
    assert not reopened.done(record(3, 1.0, fid=0.0, n=16))  # other n: another point
    assert not reopened.done(
        record(4, 1.0, fid=0.0, checkpoint="/run/step_3.ckpt")
    )  # overwritten file, new step
    assert point_key(record(3, 1.0, 1.0)) == point_key(record(3, 1.0, 2.0))
    rows = list(csv.DictReader(io.StringIO((tmp_path / "eval.csv").read_text())))
    assert [(r["step"], r["cfg_scale"], r["fid"]) for r in rows] == [
        ("3", "1.0", "50.0"),
        ("3", "3.0", "40.0"),
        ("6", "1.0", "30.0"),
    ]
    names = [p.name for p in plot(reopened.records, tmp_path)]
    assert names == ["fid_vs_cfg.png", "fid_vs_step.png"]
    with_clip = [record(3, s, 10 * s, clip_score=20 + s) for s in (1.0, 3.0)]
    assert [p.name for p in plot(with_clip, tmp_path / "c")] == ["fid_vs_cfg.png", "fid_vs_clip.png"]
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "eval.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="not an eval.json written by eval.py"):
        Results(tmp_path / "bad")
