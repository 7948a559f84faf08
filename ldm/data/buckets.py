"""Aspect-ratio bucketing: a fixed set of image sizes, each image resized and cropped into the nearest one.

A bucket is an image size ``(H, W)`` in pixels. Every side must be a multiple of the autoencoder's downsample
factor ``f`` times the UNet's spatial multiple ``2**(len(channel_mult) - 1)``, so that the latent
``(C, H/f, W/f)`` goes down every UNet level evenly: e.g. 32 px for the emoji f=4 autoencoder with a 4-level
UNet, 64 px for the SD VAE (f=8) with the SD UNet (4 levels). ``buckets_for_area`` makes an SDXL-style set of
about equal area.

An image goes to the bucket nearest in log aspect ratio, is scaled to cover it (the smaller scale at which
both sides fit) and cropped to it, centred or at a seeded random offset. What was done is kept per sample, as
SDXL's micro-conditioning needs it (Podell et al. 2023, Sec. 2.2): ``original_size`` [h, w] before resizing,
``crop_top_left`` [y, x] of the crop in the resized image and ``target_size`` [H, W] (the bucket).

Training batches are formed within a bucket (``bucket_batches``): one pending list per sample shape.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from ldm.data.rgb import WHITE, Background, open_rgb

__all__ = [
    "Bucket",
    "as_latent_shapes",
    "bucket_batches",
    "bucket_image",
    "bucket_name",
    "buckets_for_area",
    "check_buckets",
    "crop_rng",
    "latent_shape_set",
    "most_common_bucket",
    "nearest_bucket",
    "parse_buckets",
    "resize_crop",
    "size_conditioning",
]

Bucket = tuple[int, int]  # (H, W) in pixels
CROPS = ("center", "random")


def bucket_name(bucket: Sequence[int]) -> str:
    """(192, 320) -> "192x320" (H x W), the form of ``--buckets`` and of the index's ``bucket_counts``."""
    return f"{int(bucket[0])}x{int(bucket[1])}"


def parse_buckets(spec: str | Sequence[Sequence[int]]) -> list[Bucket]:
    """ "256x256,192x320" (H x W, comma separated) or [[256, 256], [192, 320]] -> [(256, 256), (192, 320)]."""
    items: list[Sequence[Any]]
    if isinstance(spec, str):
        items = [part.strip().lower().split("x") for part in spec.split(",") if part.strip()]
    else:
        items = [list(b) for b in spec]
    buckets: list[Bucket] = []
    for item in items:
        try:
            h, w = (int(v) for v in item)
        except ValueError:
            raise ValueError(
                f"bad bucket {item} in {spec!r}: write buckets as HxW, e.g. 256x256,192x320"
            ) from None
        if h < 1 or w < 1:
            raise ValueError(f"bucket {h}x{w} has a side < 1: give positive sizes, e.g. 256x256")
        if (h, w) not in buckets:
            buckets.append((h, w))
    if not buckets:
        raise ValueError(f"no bucket in {spec!r}: give at least one, e.g. --buckets 256x256")
    return buckets


def buckets_for_area(size: int, step: int = 32, max_ratio: float = 2.0) -> list[Bucket]:
    """SDXL-style buckets of about ``size``**2 pixels with sides multiple of ``step``, ordered tall to wide.

    For every short side s = step, 2 step, ..., size the long side is the multiple of ``step`` nearest to
    size**2 / s; the pair is kept (as s x long and long x s) while long / s <= ``max_ratio``. Rounding the
    long side moves the area by at most step / (2 size) of size**2 (6.25 % for 256 px and a step of 32).
    """
    if step < 1 or size < step or size % step:
        raise ValueError(
            f"bucket area side {size} must be a positive multiple of the step {step}: e.g. 256 and 32"
        )
    if max_ratio < 1:
        raise ValueError(f"max_ratio={max_ratio} must be >= 1 (the long side over the short side)")
    area = size * size
    found: set[Bucket] = set()
    for short in range(step, size + 1, step):
        long = max(short, round(area / short / step) * step)
        if long / short <= max_ratio:
            found.update({(short, long), (long, short)})
    return sorted(found, key=lambda b: b[1] / b[0])


def check_buckets(buckets: Sequence[Bucket], multiple: int) -> None:
    """Every side must be a multiple of ``multiple`` (autoencoder factor x UNet multiple)."""
    bad = [bucket_name(b) for b in buckets if b[0] % multiple or b[1] % multiple]
    if bad:
        raise ValueError(
            f"buckets {', '.join(bad)} have sides that are not multiples of {multiple} (autoencoder "
            f"downsample factor x UNet multiple): round them, or use --bucket-area with a --bucket-step "
            f"multiple of {multiple}"
        )


def nearest_bucket(height: int, width: int, buckets: Sequence[Bucket]) -> Bucket:
    """The bucket nearest in log aspect ratio |log(h/w) - log(H/W)|; ties go to the nearest log area, then the
    first listed."""
    ratio, area = math.log(height / width), math.log(height * width)

    def distance(b: Bucket) -> tuple[float, float]:
        return abs(ratio - math.log(b[0] / b[1])), abs(area - math.log(b[0] * b[1]))

    return min(buckets, key=distance)


def resize_crop(
    image: Image.Image, bucket: Bucket, rng: random.Random | None = None
) -> tuple[Image.Image, dict[str, list[int]]]:
    """Resize ``image`` to cover ``bucket`` (H, W) and crop it to that size: centred, or at a uniform random
    offset drawn from ``rng``. Returns the crop and {"original_size", "crop_top_left", "target_size"} (all
    [h|y, w|x])."""
    th, tw = bucket
    scale = max(th / image.height, tw / image.width)  # a square bucket: target / short side
    w, h = max(tw, round(image.width * scale)), max(th, round(image.height * scale))
    original = [image.height, image.width]
    if (w, h) != image.size:
        image = image.resize((w, h), Image.Resampling.BICUBIC, reducing_gap=3.0)
    if rng is None:
        top, left = (h - th) // 2, (w - tw) // 2
    else:
        top, left = rng.randint(0, h - th), rng.randint(0, w - tw)
    crop = image.crop((left, top, left + tw, top + th))
    return crop, {"original_size": original, "crop_top_left": [top, left], "target_size": [th, tw]}


def bucket_image(
    data: bytes, buckets: Sequence[Bucket], rng: random.Random | None = None, background: Background = WHITE
) -> tuple[torch.Tensor, dict[str, list[int]]]:
    """Image bytes -> (3, H, W) float in [-1, 1] in its nearest bucket (8-bit RGB over ``background``, see
    ``ldm.data.rgb``), and the resize/crop metadata."""
    with open_rgb(data, background) as im:
        crop, meta = resize_crop(im, nearest_bucket(im.height, im.width, buckets), rng)
        array = np.asarray(crop, dtype=np.uint8)  # (H, W, 3)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 127.5 - 1.0, meta  # (3, H, W)


def crop_rng(crop: str, seed: int, key: str) -> random.Random | None:
    """None for centre crops; for random crops a generator seeded by (seed, sample key): the same crop however
    the shards are split over processes."""
    if crop not in CROPS:
        raise ValueError(f"bucket crop must be one of {CROPS}, got '{crop}'")
    return None if crop == "center" else random.Random(f"{seed}/{key}")


# ---------------------------------------------------------------------------------------------- training side
def as_latent_shapes(spec: Any) -> tuple[int, ...] | tuple[tuple[int, ...], ...] | None:
    """A latent shape (C, h, w), or a list of them (one per bucket) -> a tuple, or a tuple of tuples; None
    stays.

    A list holding one shape becomes that shape, so a single bucket reads as the plain unbucketed case.
    """
    items = [] if spec is None else list(spec)
    if not items:
        return None
    if all(isinstance(v, int | np.integer) for v in items):
        return tuple(int(v) for v in items)
    shapes = tuple(dict.fromkeys(tuple(int(v) for v in s) for s in items))
    return shapes[0] if len(shapes) == 1 else shapes


def latent_shape_set(spec: Any) -> set[tuple[int, ...]] | None:
    """The accepted latent shapes as a set (see ``as_latent_shapes``); None when not fixed."""
    shape = as_latent_shapes(spec)
    if shape is None:
        return None
    return {shape} if isinstance(shape[0], int) else set(shape)  # type: ignore[arg-type]


def _shape(sample: Mapping[str, Any]) -> tuple[int, ...]:
    data = sample["latent"] if "latent" in sample else sample["image"]
    return tuple(data.shape)


def bucket_batches(samples: Iterable[dict], batch_size: int) -> Iterator[list[dict]]:
    """Batches of ``batch_size`` samples of one shape each (latent or image), from an endless sample stream.

    One pending list per shape; a batch is emitted when its list fills, the others keep their samples for
    later batches (across passes over the shards). With one shape this is plain consecutive batching. The
    number of batches is set by whoever stops the iteration, so bucketing leaves each rank's batch count
    unchanged; the costs are that a sample of a rare bucket may wait (batches are less mixed in order) and
    that at most (buckets x (batch_size - 1)) samples are held back, and dropped when the epoch stops, as a
    partial batch is.
    """
    pending: dict[tuple[int, ...], list[dict]] = {}
    for sample in samples:
        group = pending.setdefault(_shape(sample), [])
        group.append(sample)
        if len(group) == batch_size:
            yield group
            pending[_shape(sample)] = []


def size_conditioning(samples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
    """{"original_size", "crop_top_left"}: (B, 2) long tensors of [h, w] and [y, x], when every sample has
    them."""
    out: dict[str, torch.Tensor] = {}
    for name in ("original_size", "crop_top_left"):
        if samples and all(name in s for s in samples):
            out[name] = torch.tensor([list(s[name]) for s in samples], dtype=torch.long)  # (B, 2)
    return out


def most_common_bucket(meta: Mapping[str, Any]) -> Bucket | None:
    """The bucket holding most samples per a latent index meta ({"bucket_counts": {"HxW": n}}); ties go to the
    first listed. None when the shards are not bucketed."""
    counts = meta.get("bucket_counts") or {}
    if not counts:
        return None
    best = max(counts, key=lambda name: counts[name])  # max keeps the first of equals
    return parse_buckets(best)[0]
