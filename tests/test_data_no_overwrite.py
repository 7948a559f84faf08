"""No command writes over its input: an output path that is, or resolves to, an input shard, an input shard
index or another input file is refused before anything is written, however it is spelled (same directory and
prefix, ``--overwrite``, ``..``, a relative path, a symlinked directory, a hard link), and the inputs stay
byte-identical.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import prepare
from ldm.data.shards import write_shards

PATTERN = "train-{000000..000001}.tar"


def _png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _snapshot(root: Path) -> dict[str, bytes | str]:
    """Every entry under ``root``: file bytes, or where a symlink points."""
    return {
        str(p.relative_to(root)): os.readlink(p) if p.is_symlink() else p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_symlink() or p.is_file()
    }


@pytest.fixture
def images(tmp_path: Path) -> Path:
    """Image shards train-000000/1 (+ train.json) and val-000000 (+ val.json) in tmp_path/images."""
    root = tmp_path / "images"
    samples = [{"__key__": f"k{i}", "png": _png(10 * i), "txt": f"grey {i}"} for i in range(6)]
    write_shards(samples[:4], str(root), prefix="train", max_per_shard=2)
    write_shards(samples[4:], str(root), prefix="val", max_per_shard=2)
    return root


def _latents(images: Path, out: str, *extra: str) -> list[str]:
    ae = Path(__file__).resolve().parents[1] / "ldm" / "autoencoder" / "weights" / "emoji_kl_f4.safetensors"
    return [
        "latents",
        "--shards",
        str(images / PATTERN),
        "--out",
        out,
        "--autoencoder",
        str(ae) if ae.is_file() else "emoji-kl-f4",
        "--image-size",
        "8",
        "--device",
        "cpu",
        *extra,
    ]


def _refused(argv: list[str], match: str, *roots: Path) -> str:
    """Runs prepare.py with ``argv``; it must raise a one-line error matching ``match`` and leave ``roots`` as
    they were."""
    before = [_snapshot(r) for r in roots]
    with pytest.raises((ValueError, SystemExit), match=match) as caught:
        prepare.main(argv)
    message = str(caught.value)
    assert "\n" not in message
    assert [_snapshot(r) for r in roots] == before
    return message


@pytest.mark.parametrize("spelling", ["same", "dotdot", "relative", "symlink", "overwrite"])
def test_latents_out_at_the_image_shards_is_refused(
    images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, spelling: str
) -> None:
    out, extra = str(images), []
    if spelling == "dotdot":
        out = f"{images}/../{images.name}/"
    elif spelling == "relative":
        monkeypatch.chdir(images.parent)
        out = images.name
    elif spelling == "symlink":
        (tmp_path / "link").symlink_to(images, target_is_directory=True)
        out = str(tmp_path / "link")
    elif spelling == "overwrite":
        extra = ["--overwrite"]
    message = _refused(
        _latents(images, out, *extra), r"would overwrite the input .*train-00000[01]\.tar|train\.json", images
    )
    assert "--out" in message  # names the fix


def test_latents_over_other_image_shards_in_the_out_dir_is_refused(images: Path) -> None:
    """--prefix val in the image folder would replace the val image shards, which are not this run's input."""
    message = _refused(_latents(images, str(images), "--prefix", "val"), r"val-000000\.tar", images)
    assert "not a latent shard" in message and "--out" in message


def test_latents_through_a_hard_link_or_symlinked_file_is_refused(images: Path, tmp_path: Path) -> None:
    out = tmp_path / "latents"
    out.mkdir()
    os.link(images / "train-000000.tar", out / "train-000000.tar.tmp")  # the shard is written through .tmp
    _refused(_latents(images, str(out)), r"train-000000\.tar\.tmp would overwrite the input", images, out)
    (out / "train-000000.tar.tmp").unlink()
    (out / "train.json").symlink_to(images / "train.json")
    _refused(_latents(images, str(out)), r"train\.json would overwrite the input .*train\.json", images, out)


def test_latents_merge_over_the_image_index_is_refused(images: Path) -> None:
    _refused(
        ["latents-merge", "--shards", str(images / PATTERN), "--out", f"{images}/."],
        r"train\.json would overwrite the input .*train\.json.*--out",
        images,
    )


def test_export_over_the_image_index_is_refused(images: Path, tmp_path: Path) -> None:
    """--out images/train would write images/train.json (and .safetensors): refused before the checkpoint
    loads."""
    _refused(
        [
            "export-autoencoder",
            "--ckpt",
            str(tmp_path / "missing.ckpt"),
            "--shards",
            str(images / PATTERN),
            "--out",
            str(images / "train"),
        ],
        r"train\.json would overwrite the input .*--out",
        images,
    )


def test_images_out_where_an_input_resolves_is_refused(tmp_path: Path) -> None:
    """An input image that is a symlink to where the first output shard goes would be destroyed by it."""
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    out.mkdir()
    (out / "train-000000.tar").write_bytes(_png(7))  # e.g. a file the user keeps there
    (src / "a.png").symlink_to(out / "train-000000.tar")
    (src / "a.txt").write_text("a grey square")
    _refused(
        ["images", "--input", str(src), "--out", str(out)], r"train-000000\.tar .*input .*a\.png", src, out
    )


def test_a_separate_out_dir_still_works(images: Path, tmp_path: Path) -> None:
    before = _snapshot(images)
    prepare.main(_latents(images, str(tmp_path / "latents"), "--text-encoder", "none"))
    assert (tmp_path / "latents" / "train.json").is_file() and _snapshot(images) == before
    prepare.main(["latents-merge", "--shards", str(images / PATTERN), "--out", str(tmp_path / "latents")])
    assert _snapshot(images) == before
