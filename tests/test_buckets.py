"""Aspect-ratio buckets: bucket sets and assignment, resize + crop metadata, bucketed latent encoding, batches
of one shape with the rank's batch count unchanged, and a short training run whose sample grid has the
bucket's size."""

from __future__ import annotations

import io
import json
import math
import random
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_overrides
from PIL import Image
from torch.utils.data import DataLoader

import prepare
import train
from ldm.autoencoder.kl import KLAutoencoder
from ldm.autoencoder.loaders import load_kl_autoencoder, save_kl_autoencoder
from ldm.config_utils import compose_config
from ldm.data import ShardDataModule, ShardDataset, SkipCounter, write_shards
from ldm.data.buckets import (
    bucket_batches,
    bucket_image,
    buckets_for_area,
    check_buckets,
    most_common_bucket,
    nearest_bucket,
    parse_buckets,
    resize_crop,
)
from ldm.data.decode import SampleDecoder, decode_image
from ldm.encode import encode_shards
from ldm.lit.callbacks import grid_size

BUCKETS = "32x32,24x40,40x24"  # H x W; multiples of 8 = autoencoder f=4 x unet_tiny's 2
SIZES = [
    (40, 24),
    (24, 40),
    (32, 32),
    (80, 40),
    (30, 64),
    (50, 50),
    (64, 40),
    (48, 30),
]  # PIL (width, height)


# ---------------------------------------------------------------------------------------------- maths
@pytest.mark.parametrize(("size", "step", "max_ratio"), [(256, 32, 2.0), (1024, 64, 4.0), (32, 8, 2.0)])
def test_buckets_for_area_equal_area_ratios_and_multiples(size: int, step: int, max_ratio: float) -> None:
    buckets = buckets_for_area(size, step, max_ratio)
    assert (size, size) in buckets and len(set(buckets)) == len(buckets)
    for h, w in buckets:
        assert h % step == 0 and w % step == 0
        assert max(h, w) / min(h, w) <= max_ratio
        assert abs(h * w - size * size) <= step / (2 * size) * size * size  # the documented tolerance
        assert (w, h) in buckets  # symmetric
    ratios = [h / w for h, w in buckets]
    assert ratios == sorted(ratios, reverse=True)  # tall to wide
    assert buckets_for_area(256, 32, 2.0) == [(352, 192), (288, 224), (256, 256), (224, 288), (192, 352)]


def test_parse_check_and_nearest_bucket() -> None:
    buckets = parse_buckets("256x256, 192X320,320x192,256x256")
    assert (
        buckets == [(256, 256), (192, 320), (320, 192)] == parse_buckets([[256, 256], [192, 320], [320, 192]])
    )
    check_buckets(buckets, 64)
    with pytest.raises(ValueError, match="multiples of 128"):
        check_buckets(buckets, 128)
    with pytest.raises(ValueError, match="HxW"):
        parse_buckets("256")
    with pytest.raises(ValueError, match="multiple of the step"):
        buckets_for_area(250, 32)
    assert nearest_bucket(1080, 1920, buckets) == (192, 320)  # 16:9 landscape
    assert nearest_bucket(1920, 1080, buckets) == (320, 192)
    assert nearest_bucket(500, 510, buckets) == (256, 256)
    # log ratio distance: 1:1.5 is nearer 1:1.67 (|log 1.5 - log 1.67| = 0.105) than 1:1 (0.405)
    assert nearest_bucket(100, 150, buckets) == (192, 320)
    assert math.isclose(math.log(320 / 192), 0.5108, abs_tol=1e-4)
    assert nearest_bucket(64, 64, [(32, 32), (64, 64), (128, 128)]) == (64, 64)  # same ratio: nearest area


def test_resize_crop_metadata_for_known_sizes() -> None:
    def meta(w: int, h: int, bucket: tuple[int, int], rng: random.Random | None = None) -> dict:
        crop, m = resize_crop(Image.new("RGB", (w, h)), bucket, rng)
        assert crop.size == (bucket[1], bucket[0])
        return m

    assert meta(40, 24, (24, 40)) == {
        "original_size": [24, 40],
        "crop_top_left": [0, 0],
        "target_size": [24, 40],
    }
    # 100x50 (w x h) into 32x32: scale 32/50 -> 64x32, 16 px cut on each side
    assert meta(100, 50, (32, 32)) == {
        "original_size": [50, 100],
        "crop_top_left": [0, 16],
        "target_size": [32, 32],
    }
    # 30x64 into 40x24 (H x W): cover scale max(40/64, 24/30) = 0.8 -> 24 x 51, rows 5..45 of 51 kept
    assert meta(30, 64, (40, 24)) == {
        "original_size": [64, 30],
        "crop_top_left": [5, 0],
        "target_size": [40, 24],
    }
    # upscaling a small image; a random crop stays inside and repeats with the same seed
    picks = {tuple(meta(10, 30, (32, 32), random.Random(s))["crop_top_left"]) for s in range(20)}
    assert all(x == 0 and 0 <= y <= 64 for y, x in picks) and len(picks) > 1
    assert meta(10, 30, (32, 32), random.Random(3)) == meta(10, 30, (32, 32), random.Random(3))


def test_square_bucket_is_the_unbucketed_resize() -> None:
    png = _png(48, 32, seed=1)
    image, m = bucket_image(png, [(32, 32)])
    assert torch.equal(image, decode_image(png, 32)) and m["crop_top_left"] == [0, 8]


def test_bucket_batches_keep_one_shape_and_carry_leftovers() -> None:
    shapes = [(4, 8, 8), (4, 6, 10)]
    stream = ({"latent": np.zeros(shapes[i % 3 == 0]), "i": i} for i in range(60))  # 1/3 in the second shape
    batches = list(bucket_batches(stream, 4))
    assert all(len({b["latent"].shape for b in batch}) == 1 and len(batch) == 4 for batch in batches)
    assert len(batches) == 15 and [s["i"] for s in batches[0]] == [1, 2, 4, 5]


# ---------------------------------------------------------------------------------------------- encode + load
def _png(width: int, height: int, seed: int) -> bytes:
    array = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _images(n: int, start: int = 0) -> list[dict]:
    out = []
    for i in range(start, start + n):
        w, h = SIZES[i % len(SIZES)]
        out.append(
            {"__key__": f"{i:05d}", "png": _png(w, h, i), "txt": f"picture {i}", "json": {"wh": [w, h]}}
        )
    return out


@pytest.fixture(scope="module")
def bucketed(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """24 train (3 shards) + 6 val mixed-size images -> latent shards in 3 buckets by a tiny random f=4 AE."""
    root = tmp_path_factory.mktemp("buckets")
    write_shards(_images(24), str(root / "images"), prefix="train", max_per_shard=8)
    write_shards(_images(6, start=24), str(root / "images"), prefix="val", max_per_shard=8)
    torch.manual_seed(0)
    model = KLAutoencoder(
        base_channels=8, channel_mult=(1, 2, 2), z_channels=4, norm_groups=8, mid_attention=False
    )
    save_kl_autoencoder(model, str(root / "ae" / "tiny"), scale_factor=1.0)
    ae = load_kl_autoencoder(str(root / "ae" / "tiny.safetensors"))
    metas = {}
    for prefix, last in (("train", 2), ("val", 0)):
        pattern = str(root / "images" / f"{prefix}-{{000000..{last:06d}}}.tar")
        result = encode_shards(
            pattern, str(root / "latents"), prefix, ae, 32, 4, "cpu", buckets=BUCKETS, latent_multiple=2
        )
        metas[prefix] = result["meta"]
    return {"root": root, "latents": root / "latents", "ae": root / "ae" / "tiny.safetensors", "meta": metas}


def _members(shard: Path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(shard) as tar:
        for m in tar.getmembers():
            key, ext = m.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(m).read()  # type: ignore[union-attr]
    return samples


def test_encoded_latents_have_their_bucket_shape_and_keep_size_and_crop(bucketed: dict) -> None:
    seen = {}
    for shard in sorted(bucketed["latents"].glob("train-*.tar")):
        for key, s in _members(shard).items():
            latent = np.load(io.BytesIO(s["latent.npy"]))
            size, source = json.loads(s["size.json"]), json.loads(s["json"])
            w, h = source["wh"]
            assert size["original_size"] == [h, w]
            assert tuple(size["target_size"]) == nearest_bucket(h, w, parse_buckets(BUCKETS))
            assert latent.dtype == np.float16 and latent.shape == (
                4,
                size["target_size"][0] // 4,
                size["target_size"][1] // 4,
            )
            assert s["txt"] == f"picture {int(key)}".encode()
            seen[key] = size
    assert len(seen) == 24
    # 80x40 (w x h) into 24x40 (H x W): cover scale max(24/40, 40/80) = 0.6 -> 48x24, columns 4..44 kept
    assert seen["00003"] == {"original_size": [40, 80], "crop_top_left": [0, 4], "target_size": [24, 40]}
    assert seen["00004"]["crop_top_left"] == [5, 0]  # 30x64 -> 24x51, centred rows
    meta = bucketed["meta"]["train"]
    assert meta["buckets"] == [[32, 32], [24, 40], [40, 24]] and meta["latent_shape"] is None
    assert meta["latent_shapes"] == [[4, 8, 8], [4, 6, 10], [4, 10, 6]]
    assert meta["bucket_counts"] == {"32x32": 6, "24x40": 12, "40x24": 6}
    assert len(meta["latent_stats"]["channel_std"]) == 4 and meta["image_size"] is None
    index = json.loads((bucketed["latents"] / "train.json").read_text())
    assert index["total"] == 24 and index["meta"]["bucket_counts"] == meta["bucket_counts"]
    assert most_common_bucket(meta) == (24, 40) and grid_size("auto", meta) == (24, 40)


def test_pipeline_batches_share_a_shape_and_keep_the_batch_count(bucketed: dict) -> None:
    dm = ShardDataModule(f"{bucketed['latents']}/train-{{000000..000002}}.tar", batch_size=4)
    assert dm.latent_shape == ((4, 8, 8), (4, 6, 10), (4, 10, 6))
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert len(batches) == 24 // 4 == dm.train_dataset.num_batches
    for batch in batches:
        assert batch["latent"].shape[0] == 4 and batch["original_size"].shape == batch[
            "crop_top_left"
        ].shape == (4, 2)
        assert batch["original_size"].dtype == torch.long
    assert {tuple(b["latent"].shape[1:]) for b in batches} <= set(dm.latent_shape)
    urls = sorted(str(p) for p in bucketed["latents"].glob("train-*.tar"))
    for workers in (0, 2):  # more batches than one pass holds: the rank cycles, the count stays exact
        ds = ShardDataset(
            urls, "latents", batch_size=3, num_batches=11, latent_shape=dm.latent_shape, mode="cycle"
        )
        got = list(DataLoader(ds, batch_size=None, num_workers=workers))
        assert len(got) == 11 and all(tuple(b["latent"].shape[1:]) in dm.latent_shape for b in got)
    only_square = SampleDecoder("latents", latent_shape=[[4, 8, 8]])
    counter = SkipCounter()
    raw = _members(Path(urls[0]))["00001"]  # 24x40 (w x h) -> the 40x24 bucket, latent (4, 10, 6)
    assert only_square({"__key__": "00001", "__url__": urls[0], **raw}, counter) is None
    assert counter.as_dict() == {"latent_shape": 1}


def test_train_on_bucketed_shards_and_sample_grid_at_the_common_bucket(
    bucketed: dict, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    data = {"ae": bucketed["ae"], "latents": bucketed["latents"]}
    overrides = [
        o for o in tiny_overrides(data, out) if not o.startswith(("data.batch_size", "trainer.max_steps"))
    ]
    cfg = compose_config(
        "train",
        [*overrides, "data.batch_size=4", "trainer.max_steps=3", "callbacks.sample_grid.image_size=auto"],
    )
    summary = train.run(cfg)
    assert summary["global_step"] == 3 and math.isfinite(summary["metrics"]["train/loss"])
    grid = Image.open(out / "samples" / "step_000003.png")
    assert grid.size == (2 * (40 + 2) + 2, 24 + 2 + 2)  # two prompts side by side, 24x40 each, 2 px borders


def test_cli_bucket_area_flags_resume_and_settings_guard(bucketed: dict, tmp_path: Path) -> None:
    images = str(bucketed["root"] / "images" / "val-000000.tar")
    args = [
        "latents",
        "--shards",
        images,
        "--out",
        str(tmp_path),
        "--prefix",
        "val",
        "--autoencoder",
        str(bucketed["ae"]),
        "--device",
        "cpu",
        "--bucket-area",
        "32",
        "--bucket-step",
        "8",
    ]
    prepare.main(args)
    meta = json.loads((tmp_path / "val.json").read_text())["meta"]
    assert meta["buckets"] == [[40, 24], [32, 32], [24, 40]] and sum(meta["bucket_counts"].values()) == 6
    before = (tmp_path / "val-000000.tar").stat().st_mtime_ns
    prepare.main(args)  # finished: nothing re-encoded
    assert (tmp_path / "val-000000.tar").stat().st_mtime_ns == before
    with pytest.raises(ValueError, match="--overwrite"):  # other buckets, same --out
        prepare.main([*args[:-4], "--buckets", "32x32"])
    with pytest.raises(ValueError, match="multiples of 32"):  # 24 px sides vs f=4 x a 4-level UNet's 8
        prepare.main([*args, "--latent-multiple", "8"])
    with pytest.raises(SystemExit, match="not both"):
        prepare.main([*args, "--buckets", "32x32"])
