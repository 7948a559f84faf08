"""Image shards -> decoded, checked samples in batches of one image shape: what latent encoding and the
autoencoder export read. Samples are checked with training's checks and reasons (``ldm.data.decode``) and
converted to RGB with training's conversion (``ldm.data.rgb``).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence

import torch

from ldm.data.buckets import bucket_image, crop_rng
from ldm.data.decode import check_caption, check_image, check_members, decode_image
from ldm.data.rgb import WHITE, Background
from ldm.data.shards import SkipCounter
from ldm.data.tar_reader import raw_samples

__all__ = ["image_batches"]


def image_batches(
    urls: list[str],
    size: int | None,
    batch_size: int,
    counter: SkipCounter,
    buckets: Sequence[Sequence[int]] | None = None,
    crop: str = "center",
    crop_seed: int = 0,
    background: Background = WHITE,
) -> Iterator[list[dict]]:
    """Decoded samples ({"__key__", "image" (3, H, W) in [-1, 1], "txt", [json, cls], [size]}) in batches of
    one image shape.

    Without ``buckets`` every image is resized (short side to ``size``) and centre-cropped to size x size.
    With them each image goes to its nearest bucket (``ldm.data.buckets``: ``crop`` "center" or "random"
    seeded by ``crop_seed`` and the key) and "size" holds {"original_size", "crop_top_left", "target_size"}. A
    batch is emitted when its bucket has ``batch_size`` samples; the partial ones follow at the end, in order
    of first use. Transparent pixels are composited over ``background`` (``ldm.data.rgb``).
    """
    if size is None and buckets is None:
        raise ValueError(
            "image_batches needs an image size or buckets: pass size=256 or buckets=[(H, W), ...]"
        )
    pending: dict[tuple[int, ...], list[dict]] = {}
    fixed = None if buckets is None else [(int(b[0]), int(b[1])) for b in buckets]

    def decode(data: bytes, key: str) -> tuple[torch.Tensor, dict | None]:
        if fixed is None:
            return decode_image(data, int(size), background), None
        return bucket_image(data, fixed, crop_rng(crop, crop_seed, key), background)

    for raw in raw_samples(urls, counter):
        key, shard = raw["__key__"], raw.get("__url__")

        def skip(reason: str, why: str = "", key: str = key, shard: str | None = shard) -> None:
            counter.add(reason, detail=f"(key {key} in {shard}{': ' + why if why else ''}) ", shard=shard)

        text = check_caption(raw, skip) if check_members(raw, skip) else None  # training's checks and reasons
        decoded = None if text is None else check_image(raw, skip, functools.partial(decode, key=key))
        if decoded is None:
            continue
        image, sizes = decoded
        extra = {k: raw[k] for k in ("json", "cls") if k in raw}
        if sizes is not None:
            extra["size"] = sizes
        group = pending.setdefault(tuple(image.shape), [])
        group.append({"__key__": key, "image": image, "txt": text, **extra})
        if len(group) == batch_size:
            yield group
            pending[tuple(image.shape)] = []
    yield from (group for group in pending.values() if group)
