"""Latent encoding: the same bytes from 1 or 2 processes, from split ranks or after an interruption; per-shard
sidecars with the autoencoder identity; latent statistics equal to a direct computation; another autoencoder
refused.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

import prepare
from ldm.autoencoder.kl import KLAutoencoder
from ldm.autoencoder.loaders import load_kl_autoencoder, save_kl_autoencoder
from ldm.data.emoji import emoji_samples
from ldm.data.shards import read_index, write_shards
from ldm.encode import SIDECAR, encode_shards, merge_latent_index
from ldm.lit.latent_diffusion import check_latent_source

SHARDS = 4
BATCH = 4


def save_tiny_ae(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    model = KLAutoencoder(
        base_channels=8, channel_mult=(1, 2, 2), z_channels=4, norm_groups=8, mid_attention=False
    )
    save_kl_autoencoder(model, str(path), scale_factor=0.7)
    return path.with_suffix(".safetensors")


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Bit-identical latents need the same threads per process (CPU float sums depend on it): 1 here, as in
    the two spawned workers, which get this process's threads / 2."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """24 emoji in 4 image shards of 6, and two different tiny random autoencoders (f=4: 32 px -> 8x8x4)."""
    root = tmp_path_factory.mktemp("encode")
    write_shards(emoji_samples(size=32, limit=24), str(root / "images"), prefix="train", max_per_shard=6)
    ae_path = save_tiny_ae(root / "ae" / "tiny", seed=0)
    other_path = save_tiny_ae(root / "ae" / "other", seed=1)
    pattern = str(root / "images" / f"train-{{000000..{SHARDS - 1:06d}}}.tar")
    return {"root": root, "pattern": pattern, "ae_path": ae_path, "other_path": other_path}


def encode(setup: dict, out: Path, **kwargs) -> dict:
    ae = load_kl_autoencoder(str(kwargs.pop("ae_path", setup["ae_path"])))
    return encode_shards(setup["pattern"], str(out), "train", ae, 32, BATCH, "cpu", **kwargs)


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("train-*.tar"))}


def index(out: Path) -> dict:
    return json.loads((out / "train.json").read_text())


def latents_of(shard: Path) -> list[np.ndarray]:
    with tarfile.open(shard) as tar:
        members = sorted(
            (m for m in tar.getmembers() if m.name.endswith(".latent.npy")), key=lambda m: m.name
        )
        return [np.load(io.BytesIO(tar.extractfile(m).read())) for m in members]  # type: ignore[union-attr]


@pytest.fixture(scope="module")
def reference(setup: dict) -> Path:
    """The single-process encode that every other way of encoding must reproduce."""
    out = setup["root"] / "one_proc"
    result = encode(setup, out)
    assert result["encoded"] == [f"train-{i:06d}.tar" for i in range(SHARDS)]
    assert result["meta"] == index(out)["meta"]
    return out


def test_two_processes_from_the_cli_give_identical_bytes_and_index(setup: dict, reference: Path) -> None:
    out = setup["root"] / "two_procs"
    prepare.main(
        [
            "latents",
            "--shards",
            setup["pattern"],
            "--out",
            str(out),
            "--autoencoder",
            str(setup["ae_path"]),
            "--image-size",
            "32",
            "--batch-size",
            str(BATCH),
            "--num-procs",
            "2",
            "--devices",
            "cpu",
        ]
    )
    assert shard_bytes(out) == shard_bytes(reference) and len(shard_bytes(out)) == SHARDS
    assert index(out) == index(reference)
    for i in range(SHARDS):
        name = f"train-{i:06d}.tar{SIDECAR}"
        assert json.loads((out / name).read_text()) == json.loads((reference / name).read_text())


def test_split_ranks_then_merge(setup: dict, reference: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = setup["root"] / "ranks"
    monkeypatch.setenv("WORLD_SIZE", "2")  # as under torchrun; --rank/--world-size arguments win over the env
    monkeypatch.setenv("RANK", "1")
    first = encode(setup, out)
    assert first == {
        "encoded": ["train-000001.tar", "train-000003.tar"],
        "meta": None,
    }  # rank 0 still missing
    assert not (out / "train.json").exists()
    last = encode(setup, out, rank=0)
    assert last["encoded"] == ["train-000000.tar", "train-000002.tar"] and last["meta"] is not None
    assert shard_bytes(out) == shard_bytes(reference) and index(out) == index(reference)
    (out / "train.json").unlink()  # the merge subcommand rebuilds the same index from the sidecars
    prepare.main(["latents-merge", "--shards", setup["pattern"], "--out", str(out)])
    assert index(out) == index(reference)


def test_interrupted_encode_resumes_only_unfinished_shards(setup: dict, reference: Path) -> None:
    out = setup["root"] / "resume"
    encode(setup, out)
    (out / "train-000001.tar").unlink()  # killed while writing shard 1: only its .tmp is left
    (out / f"train-000001.tar{SIDECAR}").unlink()
    (out / "train-000001.tar.tmp").write_bytes(b"half a tar")
    (out / f"train-000002.tar{SIDECAR}").unlink()  # killed after the shard's rename, before its sidecar
    (out / "train.json").unlink()
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("train-00000[03].tar")}
    result = encode(setup, out)
    assert result["encoded"] == ["train-000001.tar", "train-000002.tar"]
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("train-00000[03].tar")} == mtimes  # not rewritten
    assert not list(out.glob("*.tmp"))
    assert shard_bytes(out) == shard_bytes(reference) and index(out) == index(reference)
    assert (
        encode(setup, out)["encoded"] == []
    )  # all finished: nothing to do, the index is rewritten identically
    assert index(out) == index(reference)
    image = Path(setup["pattern"].replace("{000000..000003}", "000003"))
    os.utime(
        image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 1)
    )  # the image shard was rewritten
    assert encode(setup, out)["encoded"] == ["train-000003.tar"]


def test_latent_stats_equal_a_direct_computation(setup: dict, reference: Path) -> None:
    per_shard = [
        torch.from_numpy(np.stack(latents_of(reference / f"train-{i:06d}.tar"))) for i in range(SHARDS)
    ]
    z = torch.cat(per_shard).double()  # (N, C, h, w), the fp16 latents as stored
    stats = read_index(str(reference / "train.json"))["meta"]["latent_stats"]
    torch.testing.assert_close(
        torch.tensor(stats["channel_mean"], dtype=torch.float64), z.mean(dim=(0, 2, 3)), rtol=1e-9, atol=1e-12
    )
    torch.testing.assert_close(
        torch.tensor(stats["channel_std"], dtype=torch.float64),
        z.transpose(0, 1).flatten(1).std(dim=1),
        rtol=1e-9,
        atol=1e-12,
    )
    assert stats["mean"] == pytest.approx(float(z.mean()), rel=1e-9, abs=1e-12)
    assert stats["std"] == pytest.approx(float(z.std()), rel=1e-9)
    assert stats["count"] == z.numel()
    side = json.loads((reference / f"train-000002.tar{SIDECAR}").read_text())  # each shard's own stats too
    torch.testing.assert_close(
        torch.tensor(side["latent_stats"]["channel_mean"], dtype=torch.float64),
        per_shard[2].double().mean(dim=(0, 2, 3)),
    )


def test_sidecar_and_index_show_the_autoencoder_identity(setup: dict, reference: Path) -> None:
    ae = load_kl_autoencoder(str(setup["ae_path"]))
    side = json.loads((reference / f"train-000000.tar{SIDECAR}").read_text())
    assert side["settings"]["autoencoder"] == ae.identity
    assert side["settings"]["latent_shape"] == [4, 8, 8] and side["settings"]["image_size"] == 32
    assert side["source"]["url"] == str(
        Path(setup["pattern"].replace("{000000..000003}", "000000")).resolve()
    )
    assert side["count"] == 6 and side["skipped"] == {}
    idx = read_index(str(reference / "train.json"))
    assert idx["shards"] == [f"train-{i:06d}.tar" for i in range(SHARDS)] and idx["total"] == 24
    meta = idx["meta"]
    assert (
        meta["autoencoder"] == ae.identity
        and meta["latent_shape"] == [4, 8, 8]
        and meta["text_encoder"] is None
    )
    assert {"source", "image_size", "latent_stats", "moments", "skipped", "image_shards"} <= set(meta)
    check_latent_source(meta, ae)  # training accepts them with the same autoencoder ...
    with pytest.raises(ValueError, match="made by autoencoder"):  # ... and refuses them with another
        check_latent_source(meta, load_kl_autoencoder(str(setup["other_path"])))


def test_another_autoencoder_on_resume_is_refused_unless_overwrite(setup: dict, reference: Path) -> None:
    out = setup["root"] / "other"
    encode(setup, out)
    other = load_kl_autoencoder(str(setup["other_path"]))
    with pytest.raises(ValueError) as err:
        encode(setup, out, ae_path=setup["other_path"])
    message = str(err.value)
    assert "\n" not in message and "--overwrite" in message
    assert load_kl_autoencoder(str(setup["ae_path"])).identity["sha256"][:12] in message
    assert other.identity["sha256"][:12] in message
    result = encode(setup, out, ae_path=setup["other_path"], overwrite=True)
    assert len(result["encoded"]) == SHARDS and index(out)["meta"]["autoencoder"] == other.identity
    assert merge_latent_index(setup["pattern"], str(out), "train") == index(out)["meta"]


def _png(size: int, colour: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (size, size), (colour, 0, 0)).save(buf, format="PNG")
    return buf.getvalue()


def test_bad_samples_are_counted_and_the_rest_encoded(
    setup: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A caption that is not UTF-8 (caption_not_utf8), a .png that is no image and a decompression bomb (PIL
    raises a plain Exception; decode_error), and a blank caption are skipped under training's reasons; the
    good samples are encoded."""
    from PIL import Image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1500)  # 64x64 = 4096 > 2 x 1500: DecompressionBombError
    samples = [
        {"__key__": "good0", "png": _png(32, 10), "txt": "a red square"},
        {"__key__": "notutf8", "png": _png(32, 20), "txt": b"\xff\xfe caption"},
        {"__key__": "notimage", "png": b"this is not a png", "txt": "a caption"},
        {"__key__": "bomb", "png": _png(64, 30), "txt": "a big square"},
        {"__key__": "blank", "png": _png(32, 40), "txt": "  "},
        {"__key__": "good1", "png": _png(32, 50), "txt": "another red square"},
    ]
    write_shards(samples, str(tmp_path / "images"), prefix="bad", max_per_shard=10)
    ae = load_kl_autoencoder(str(setup["ae_path"]))
    pattern = str(tmp_path / "images" / "bad-000000.tar")
    result = encode_shards(pattern, str(tmp_path / "latents"), "bad", ae, 32, BATCH, "cpu")
    assert result["meta"]["skipped"] == {"caption_not_utf8": 1, "decode_error": 2, "missing_caption": 1}
    side = json.loads((tmp_path / "latents" / f"bad-000000.tar{SIDECAR}").read_text())
    assert side["count"] == 2 and side["skipped"] == {
        "caption_not_utf8": 1,
        "decode_error": 2,
        "missing_caption": 1,
    }
    with tarfile.open(tmp_path / "latents" / "bad-000000.tar") as tar:
        assert sorted(m.name for m in tar.getmembers()) == [
            "good0.latent.npy",
            "good0.txt",
            "good1.latent.npy",
            "good1.txt",
        ]


def test_a_missing_image_shard_is_refused_not_renumbered(setup: dict, tmp_path: Path) -> None:
    """Dropping train-000004 would shift the numbering of every later latent shard: encoding names it
    instead."""
    pattern = setup["pattern"].replace(f"{SHARDS - 1:06d}}}", f"{SHARDS:06d}}}")  # one shard past the last
    ae = load_kl_autoencoder(str(setup["ae_path"]))
    with pytest.raises(
        FileNotFoundError, match=r"1 of 5 shards .*train-000004\.tar\): latent shard i"
    ) as err:
        encode_shards(pattern, str(tmp_path / "out"), "train", ae, 32, BATCH, "cpu")
    assert "\n" not in str(err.value) and not (tmp_path / "out" / "train-000000.tar").exists()


def test_max_per_shard_is_refused_for_latents(setup: dict, tmp_path: Path) -> None:
    with pytest.raises(
        SystemExit, match="latent shard i mirrors image shard i.*prepare.py images --max-per-shard"
    ):
        prepare.main(
            [
                "latents",
                "--shards",
                setup["pattern"],
                "--out",
                str(tmp_path),
                "--autoencoder",
                str(setup["ae_path"]),
                "--max-per-shard",
                "5",
            ]
        )
