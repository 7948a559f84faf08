"""Sample quality of a model on its own data: prompts and reference images from shards, generated images
scored.

The glue between ``ldm.data`` (shards), ``ldm.evaluation`` (torch-only metrics) and ``ldm.generate``
(sampling), shared by ``eval.py`` and the training callback ``ldm.lit.sample_quality.SampleQuality``:

- ``shard_kind`` / ``shard_captions``: what the (validation) shards hold, and their captions as prompts;
- ``reference_batches``: their images (B, 3, H, W) in [0, 1], decoded as in training, or their latents decoded
  by the model's autoencoder; ``reference_identity``: what a cached statistic must match;
- ``score_features``: FID / KID (and the mean CLIP score) of generated features against a reference.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from ldm.data.decode import check_caption, check_image, check_members, decode_image, decode_latent
from ldm.data.shards import SkipCounter
from ldm.data.tar_reader import raw_samples
from ldm.evaluation.metrics import frechet_distance, gaussian_stats, kernel_distance
from ldm.evaluation.reference import ReferenceStats, file_identity

log = logging.getLogger(__name__)


def shard_samples(urls: list[str], limit: int, counter: SkipCounter) -> Iterator[dict[str, Any]]:
    """Raw samples with a usable caption, at most ``limit``; bad ones counted in ``counter`` by reason."""
    taken = 0
    for raw in raw_samples(urls, counter):
        if taken >= limit:
            return

        def skip(reason: str, why: str = "", raw: dict = raw) -> None:
            counter.add(reason, detail=f"(key {raw['__key__']}: {why}) ", shard=raw.get("__url__"))

        text = check_caption(raw, skip) if check_members(raw, skip) else None
        if text is not None:
            taken += 1
            yield {**raw, "txt": text}


def shard_kind(urls: list[str], what: str = "shards") -> str:
    """ "latents" or "images": what the first captioned sample holds."""
    samples = shard_samples(urls, 1, SkipCounter("peek"))
    first = next(samples, None)
    samples.close()  # the reader's shard (or pipe) is closed now, not at garbage collection
    if first is None:
        raise ValueError(
            f"{what} '{urls[0]}'... hold no captioned sample: pass validation shards with captions"
        )
    return "latents" if "latent.npy" in first else "images"


def shard_captions(urls: list[str], limit: int) -> list[str]:
    return [s["txt"] for s in shard_samples(urls, limit, SkipCounter("captions"))]


def reference_identity(
    urls: list[str],
    limit: int,
    kind: str,
    image_size: int,
    autoencoder_identity: dict | None,
    background: Any,
) -> dict[str, Any]:
    """What cached reference statistics must have been made from (the extractor is added by
    ``load_or_compute``)."""
    source: dict[str, Any] = {"kind": kind, "image_size": int(image_size)}
    if kind == "latents":
        source["autoencoder"] = autoencoder_identity
    else:
        source["alpha_background"] = list(background)
    return {"shards": [file_identity(u) for u in urls], "max_images": int(limit), "source": source}


def _item(raw: dict[str, Any], kind: str, size: int, background: Any, counter: SkipCounter) -> Any:
    """One image (3, H, W) in [0, 1] or latent (C, h, w); None once ``counter`` has counted why not."""

    def skip(reason: str, why: str = "") -> None:
        counter.add(reason, detail=f"(key {raw['__key__']}: {why}) ", shard=raw.get("__url__"))

    if kind == "images":
        return check_image(raw, skip, lambda data: (decode_image(data, size, background) + 1) / 2)
    if "latent.npy" not in raw:
        return skip("missing_latent")
    try:
        latent = decode_latent(raw["latent.npy"])
    except ValueError as err:
        return skip("decode_error", str(err))
    return latent if latent is not None else skip("decode_error", "not a finite (C, h, w) float array")


def reference_batches(
    urls: list[str],
    kind: str,
    image_size: int,
    limit: int,
    batch_size: int,
    background: Any,
    decode: Callable[[torch.Tensor], torch.Tensor] | None,
    wrap: Callable[[Iterator[Any]], Iterator[Any]] = lambda it: it,
) -> Iterator[torch.Tensor]:
    """(B, 3, H, W) in [0, 1]: images decoded as in training, or latents through ``decode`` (the
    autoencoder's, returning about [-1, 1]). ``wrap`` may add a progress bar around the sample iterator."""
    counter = SkipCounter("reference")
    pending: list[torch.Tensor] = []

    def flush() -> torch.Tensor:
        batch = torch.stack(pending)
        if kind == "images":
            return batch
        if decode is None:
            raise ValueError("latent reference shards need the autoencoder's decode")
        with torch.no_grad():
            return ((decode(batch).float() + 1) / 2).clamp(0, 1)  # (B, 3, H, W)

    for raw in wrap(shard_samples(urls, limit, counter)):
        item = _item(raw, kind, image_size, background, counter)
        if item is not None:
            pending.append(item)
        if len(pending) == batch_size:
            yield flush()
            pending = []
    if pending:
        yield flush()
    if counter.total():
        log.warning("reference: skipped %s", counter.as_dict())


def score_features(
    features: torch.Tensor,
    ref: ReferenceStats,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    seed: int = 0,
    clip_scores: Sequence[torch.Tensor] = (),
) -> dict[str, Any]:
    """FID, KID (mean, std) and the mean CLIP score of generated features (n, D) against the reference."""
    fid = frechet_distance(ref.stats, gaussian_stats(features))
    kid, kid_std = kernel_distance(ref.features, features, kid_subsets, kid_subset_size, seed=seed)
    clip = float(torch.cat(list(clip_scores)).mean()) if clip_scores else None
    return {
        "fid": fid,
        "kid": kid,
        "kid_std": kid_std,
        "clip_score": clip,
        "n": int(len(features)),
        "ref_n": ref.n,
    }
