"""Images of any mode become the right 8-bit RGB, the same way wherever they are decoded; captions that are
not UTF-8 are skipped and counted, not fatal.

16-bit grayscale maps 0..65535 onto 0..255 (round(v / 257)), not clipped to white; transparency (RGBA, LA, P
with a transparent index, a tRNS colour) is composited over a configurable background, white by default:
half-transparent red on white is (255, 127, 127).
"""

from __future__ import annotations

import io
import json
import logging
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

import prepare
from ldm.data import ShardDataModule, ShardDataset, SkipCounter, folder_samples, write_shards
from ldm.data.buckets import bucket_image
from ldm.data.decode import decode_image
from ldm.data.rgb import parse_background, to_rgb
from ldm.encode import image_batches

RED_HALF = (255, 0, 0, 128)


def _save(im: Image.Image, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG", **kwargs)
    return buf.getvalue()


def _png16(array: np.ndarray, color_type: int) -> bytes:
    """A 16-bit PNG written by hand (Pillow cannot write 48-bit RGB): (H, W[, C]) uint16; type 0 gray, 2 RGB,
    4 gray+alpha, 6 RGBA."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    h, w = array.shape[:2]
    rows = b"".join(b"\0" + array[y].astype(">u2").tobytes() for y in range(h))
    header = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def _pixels(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) in [-1, 1] -> (H, W, 3) uint8, exactly (the decoders map v -> v / 127.5 - 1)."""
    return np.rint((image.permute(1, 2, 0).numpy() + 1) * 127.5).astype(np.uint8)


def _rgb(data: bytes, background: object = "white") -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(to_rgb(im, parse_background(background)))


GRADIENT = np.arange(0, 65536, 257 * 15, dtype=np.uint16)[None, :]  # 0, 3855, ..., 65535 (18 values)


def test_16_bit_gray_maps_onto_8_bits_not_white() -> None:
    expected = np.rint(GRADIENT / 257).astype(np.uint8)  # 0, 15, 30, ..., 255
    for data in (_save(Image.fromarray(GRADIENT)), _png16(GRADIENT, 0)):  # Pillow's I;16, and a PNG by hand
        assert Image.open(io.BytesIO(data)).mode == "I;16"
        assert (_rgb(data) == expected[..., None]).all()
    odd = np.array([[128, 129, 32896, 65535]], np.uint16)  # round(v / 257): 0.498 -> 0, 0.502 -> 1, 128, 255
    assert _rgb(_png16(odd, 0))[0, :, 0].tolist() == [0, 1, 128, 255]
    as_int = Image.fromarray(GRADIENT.astype(np.int32))  # mode I, as older Pillows load 16-bit PNGs
    assert as_int.mode == "I" and (np.asarray(to_rgb(as_int, (255, 255, 255))) == expected[..., None]).all()


def test_48_bit_rgb_keeps_pillows_high_byte() -> None:
    """Pillow loads 16-bit RGB as 8-bit RGB keeping the high byte (floor(v / 256), within 1 of round(v /
    257))."""
    rgb = np.array([[[65535, 0, 32896], [257 * 100, 257 * 50 + 200, 300]]], np.uint16)
    assert _rgb(_png16(rgb, 2)).tolist() == [[[255, 0, 128], [100, 50, 1]]]


def test_transparency_is_composited_on_the_background() -> None:
    rgba = _save(Image.new("RGBA", (2, 2), RED_HALF))
    assert _rgb(rgba)[0, 0].tolist() == [255, 127, 127]  # (255*128 + 255*127) / 255, (255*127) / 255
    assert _rgb(rgba, "black")[0, 0].tolist() == [128, 0, 0]
    assert _rgb(rgba, "#0000ff")[0, 0].tolist() == [128, 0, 127]
    assert _rgb(rgba, [0, 255, 0])[0, 0].tolist() == [128, 127, 0]
    la = _save(Image.new("LA", (1, 1), (0, 128)))  # black, half transparent
    assert _rgb(la)[0, 0].tolist() == [127, 127, 127] and _rgb(la, "black")[0, 0].tolist() == [0, 0, 0]
    rgba16 = np.array([[[65535, 0, 0, 32768], [0, 0, 65535, 0]]], np.uint16)  # 16-bit RGBA: alpha 128 and 0
    assert _rgb(_png16(rgba16, 6)).tolist() == [[[255, 127, 127], [255, 255, 255]]]
    la16 = np.array([[[0, 32768], [65535, 65535]]], np.uint16)
    assert _rgb(_png16(la16, 4)).tolist() == [[[127, 127, 127], [255, 255, 255]]]


def test_palette_and_trns_transparency() -> None:
    p = Image.new("P", (2, 1))
    p.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    p.putdata([0, 1])
    assert _rgb(_save(p, transparency=1)).tolist() == [[[255, 0, 0], [255, 255, 255]]]  # index 1 transparent
    assert _rgb(_save(p)).tolist() == [[[255, 0, 0], [0, 0, 255]]]  # no transparency: as is
    rgb = Image.fromarray(np.array([[[10, 20, 30], [1, 2, 3]]], np.uint8))
    assert _rgb(_save(rgb, transparency=(10, 20, 30)), "black").tolist() == [[[0, 0, 0], [1, 2, 3]]]
    gray = Image.fromarray(np.array([[5, 7]], np.uint8))
    assert _rgb(_save(gray, transparency=5)).tolist() == [[[255, 255, 255], [7, 7, 7]]]
    gray16 = Image.fromarray(np.array([[5, 65535]], np.uint16))
    assert _rgb(_save(gray16, transparency=5), "black").tolist() == [[[0, 0, 0], [255, 255, 255]]]


def test_background_spellings_and_errors() -> None:
    assert parse_background("white") == (255, 255, 255) and parse_background("BLACK") == (0, 0, 0)
    assert parse_background("#FF8000") == (255, 128, 0) == parse_background("255,128,0")
    assert parse_background((1, 2, 3)) == (1, 2, 3)
    for bad in ("grey", "#12345", "1,2", [0, 0, 256]):
        with pytest.raises(ValueError, match=r"alpha_background .*white, black, #rrggbb or r,g,b"):
            parse_background(bad)


def test_every_decoder_shares_the_conversion(tmp_path: Path) -> None:
    """Training images (ShardDataset / ShardDataModule data.alpha_background), encoding (image_batches,
    buckets) and the folder source give the same composited pixels."""
    rgba = _save(Image.new("RGBA", (8, 8), RED_HALF))
    gray16 = _save(Image.fromarray(np.full((8, 8), 32896, np.uint16)))
    assert _pixels(decode_image(rgba, 8))[0, 0].tolist() == [255, 127, 127]
    assert _pixels(decode_image(rgba, 8, (0, 0, 0)))[0, 0].tolist() == [128, 0, 0]
    assert _pixels(bucket_image(rgba, [(8, 8)], None, (0, 0, 0))[0])[0, 0].tolist() == [128, 0, 0]
    assert _pixels(decode_image(gray16, 8))[0, 0].tolist() == [128, 128, 128]
    write_shards(
        [{"__key__": "a", "png": rgba, "txt": "red"}, {"__key__": "g", "png": gray16, "txt": "grey"}],
        str(tmp_path / "img"),
        prefix="train",
        max_per_shard=10,
    )
    url = str(tmp_path / "img" / "train-000000.tar")
    ds = ShardDataset(
        [url], "images", batch_size=2, num_batches=1, image_size=8, shuffle=False, alpha_background="black"
    )
    batch = next(iter(DataLoader(ds, batch_size=None)))
    assert [_pixels(im)[0, 0].tolist() for im in batch["image"]] == [[128, 0, 0], [128, 128, 128]]
    dm = ShardDataModule(url, kind="images", batch_size=2, image_size=8, alpha_background="#0000ff")
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert sorted(_pixels(im)[0, 0].tolist() for im in batch["image"]) == [[128, 0, 127], [128, 128, 128]]
    batches = list(image_batches([url], 8, 2, SkipCounter(), background=(0, 255, 0)))
    assert [_pixels(s["image"])[0, 0].tolist() for s in batches[0]] == [[128, 127, 0], [128, 128, 128]]
    with pytest.raises(ValueError, match="alpha_background"):
        ShardDataModule(url, kind="images", batch_size=2, image_size=8, alpha_background="grey")


def test_encode_records_the_background_and_prepare_has_the_flag(tmp_path: Path) -> None:
    from test_data_no_overwrite import _latents

    rgba = _save(Image.new("RGBA", (8, 8), RED_HALF))
    write_shards(
        [{"__key__": f"k{i}", "png": rgba, "txt": "red"} for i in range(2)],
        str(tmp_path / "images"),
        prefix="train",
        max_per_shard=1,
    )
    prepare.main(_latents(tmp_path / "images", str(tmp_path / "black"), "--alpha-background", "black"))
    prepare.main(_latents(tmp_path / "images", str(tmp_path / "white")))
    black = json.loads((tmp_path / "black" / "train.json").read_text())["meta"]
    white = json.loads((tmp_path / "white" / "train.json").read_text())["meta"]
    assert black["alpha_background"] == [0, 0, 0] and white["alpha_background"] == [255, 255, 255]
    assert black["latent_stats"] != white["latent_stats"]  # the background reached the autoencoder


def test_prepare_images_skips_and_counts_captions_that_are_not_utf8(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for i, caption in enumerate([b"a red square", "caf\xe9".encode("latin-1"), b"  ", "caf\xe9".encode()]):
        (src / f"{i}.png").write_bytes(_save(Image.new("RGB", (4, 4), (i, 0, 0))))
        (src / f"{i}.txt").write_bytes(caption)
    (src / "4.png").write_bytes(_save(Image.fromarray(GRADIENT)))
    (src / "4.txt").write_text("a 16-bit gradient")
    counter = SkipCounter()
    samples = list(folder_samples(str(src), counter))
    assert [s["txt"] for s in samples] == ["a red square", "caf\xe9", "a 16-bit gradient"]
    assert counter.as_dict() == {"caption_not_utf8": 1, "missing_caption": 1}
    with caplog.at_level(logging.INFO):
        prepare.main(["images", "--input", str(src), "--out", str(tmp_path / "out")])
    assert json.loads((tmp_path / "out" / "train.json").read_text())["total"] == 3
    summary = [r.getMessage() for r in caplog.records if r.getMessage().startswith("images: ")]
    assert summary == [
        f"images: 3 samples written to {tmp_path / 'out'}, 2 skipped: "
        "{'caption_not_utf8': 1, 'missing_caption': 1}"
    ]
