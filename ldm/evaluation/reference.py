"""Reference statistics of real images: computed once, cached as ``.npz`` with the identity of what made them.

The cache holds mu (D,), sigma (D, D) (float64), up to ``max_kid_features`` feature rows (float32, for KID)
and an identity dict: where the images came from (shard urls with size and mtime, or whatever the caller
names), how many were asked for, the image size, the source (image shards, or latent shards and the
autoencoder that decodes them) and the extractor (name + weights sha). Loading under another identity is
refused in one line that names what differs: statistics of other images or another network would make every
FID silently wrong.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ldm.evaluation.features import FeatureExtractor
from ldm.evaluation.metrics import GaussianStats, gaussian_stats

log = logging.getLogger(__name__)


@dataclass
class ReferenceStats:
    stats: GaussianStats
    features: np.ndarray  # (min(n, max_kid_features), D) float32, the first rows in reading order
    identity: dict[str, Any]

    @property
    def n(self) -> int:
        return self.stats.n


def file_identity(url: str) -> dict[str, Any]:
    """{url, size, mtime} of a local file; {url} alone for a remote one (its content cannot be stat'ed)."""
    path = Path(url.removeprefix("file://"))
    if "://" in url.removeprefix("file://") or url.startswith("pipe:") or not path.is_file():
        return {"url": url}
    stat = path.stat()
    return {"url": str(path.resolve()), "size": stat.st_size, "mtime": int(stat.st_mtime)}


def extractor_identity(extractor: FeatureExtractor) -> dict[str, Any]:
    return {"name": extractor.name, "sha": extractor.sha, "dim": int(extractor.dim)}


def compute_reference(
    batches: Iterable[torch.Tensor],
    extractor: FeatureExtractor,
    identity: dict[str, Any],
    max_kid_features: int = 10_000,
) -> ReferenceStats:
    """Features of every image batch (B, 3, H, W) in [0, 1] -> mean, covariance and a KID subsample."""
    features = [extractor(batch).float().cpu() for batch in batches]  # each (B, D)
    if not features:
        raise ValueError("no reference images were read: check the shards (they hold no decodable images)")
    all_features = torch.cat(features).numpy()  # (n, D)
    stats = gaussian_stats(all_features)
    identity = {**identity, "extractor": extractor_identity(extractor)}
    return ReferenceStats(stats, all_features[:max_kid_features].astype(np.float32), identity)


def save_reference(ref: ReferenceStats, path: str | Path) -> None:
    """Atomic write of ``path`` (.npz): a killed run leaves no half file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    np.savez(
        buffer,
        mu=ref.stats.mu,
        sigma=ref.stats.sigma,
        n=np.int64(ref.stats.n),
        features=ref.features,
        identity=np.array(json.dumps(ref.identity, sort_keys=True)),
    )
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)  # one per writer
    with os.fdopen(fd, "wb") as f:
        f.write(buffer.getvalue())
    os.replace(tmp, path)


def identity_differences(stored: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """The top-level keys whose values differ (a key on one side only counts)."""
    return sorted(k for k in set(stored) | set(wanted) if stored.get(k) != wanted.get(k))


def _short(value: Any, limit: int = 120) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def load_reference(path: str | Path, identity: dict[str, Any]) -> ReferenceStats:
    """The cached statistics at ``path``; ValueError when they were made from other data or another extractor.

    ``identity`` must include ``extractor`` (``extractor_identity``) as ``compute_reference`` stores it."""
    path = Path(path)
    identity = json.loads(json.dumps(identity, sort_keys=True))  # tuples -> lists, as stored
    try:
        with np.load(path, allow_pickle=False) as data:
            stored = json.loads(str(data["identity"]))
            stats = GaussianStats(mu=data["mu"], sigma=data["sigma"], n=int(data["n"]))
            features = data["features"]
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(
            f"reference stats '{path}' cannot be read ({type(err).__name__}): delete it to recompute them"
        ) from None
    differ = identity_differences(stored, identity)
    if differ:
        first = differ[0]
        raise ValueError(
            f"reference stats '{path}' were computed with other {', '.join(differ)} ({first}: stored "
            f"{_short(stored.get(first))}, now {_short(identity.get(first))}): delete the file to recompute "
            "them, or pass ref_stats=PATH to keep both"
        )
    return ReferenceStats(stats, features, stored)


def load_or_compute(
    path: str | Path,
    identity: dict[str, Any],
    extractor: FeatureExtractor,
    batches: Iterable[torch.Tensor],
    max_kid_features: int = 10_000,
) -> ReferenceStats:
    """The cache at ``path`` if it matches ``identity``, else computed from ``batches`` (read lazily) and
    saved."""
    wanted = {**identity, "extractor": extractor_identity(extractor)}
    if Path(path).is_file():
        ref = load_reference(path, wanted)
        log.info("reference stats: %d images from %s", ref.n, path)
        return ref
    ref = compute_reference(batches, extractor, identity, max_kid_features)
    save_reference(ref, path)
    log.info("reference stats: %d images, saved to %s", ref.n, path)
    return ref
