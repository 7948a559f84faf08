"""Reading WebDataset shards into ready batches: split by rank and worker, seeded shuffle, equal batch counts.

Every rank yields exactly ``num_batches`` batches per epoch whatever the shard count, so DDP never hangs on
uneven shards: a rank or worker with fewer shards cycles through its own again. Skipped samples are counted
per reason and reported with each batch under ``"skipped"``.
"""

from __future__ import annotations

import io
import logging
import random
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import braceexpand
import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from ldm.data.shards import SkipCounter

log = logging.getLogger(__name__)

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")
KINDS = ("images", "latents")


def _is_remote(url: str) -> bool:
    return url.startswith("pipe:") or ("://" in url and not url.startswith("file://"))


def _split_top_level_commas(pattern: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(pattern):
        depth += ch == "{"
        depth -= ch == "}"
        if ch == "," and depth == 0:
            parts.append(pattern[start:i])
            start = i + 1
    parts.append(pattern[start:])
    return [p.strip() for p in parts if p.strip()]


def expand_urls(pattern: str) -> list[str]:
    """Expands braces (``part-{00000..00099}.tar``) and comma lists; local paths must exist."""
    urls = [u for part in _split_top_level_commas(pattern) for u in braceexpand.braceexpand(part)]
    local = [u.removeprefix("file://") for u in urls if not _is_remote(u)]
    existing = [u for u in local if Path(u).is_file()]
    if local and not existing:
        raise FileNotFoundError(
            f"No shard matches '{pattern}': check the path, or the brace range such as data/train-{{000000..000003}}.tar"
        )
    if len(existing) < len(local):
        log.warning("%d of %d shards in '%s' do not exist; using the %d that do", len(local) - len(existing),
                    len(local), pattern, len(existing))  # fmt: skip
    keep = set(existing)
    return [u for u in urls if _is_remote(u) or u.removeprefix("file://") in keep]


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def resolve_rank(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """Fills rank / world size from torch.distributed when initialised, else 0 / 1."""
    dist = torch.distributed
    initialised = dist.is_available() and dist.is_initialized()
    rank = rank if rank is not None else (dist.get_rank() if initialised else 0)
    world_size = world_size if world_size is not None else (dist.get_world_size() if initialised else 1)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}: pass 0 <= rank < world_size")
    return rank, world_size


def decode_image(data: bytes, size: int) -> torch.Tensor:
    """Image bytes -> (3, size, size) float in [-1, 1]: resize the short side to ``size``, centre crop."""
    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("RGB")
        scale = size / min(im.size)
        w, h = max(size, round(im.width * scale)), max(size, round(im.height * scale))
        if (w, h) != im.size:
            im = im.resize((w, h), Image.Resampling.BICUBIC, reducing_gap=3.0)
        left, top = (w - size) // 2, (h - size) // 2
        im = im.crop((left, top, left + size, top + size))
        array = np.asarray(im, dtype=np.uint8)  # (H, W, 3)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 127.5 - 1.0  # (3, H, W)


def decode_latent(data: bytes) -> torch.Tensor | None:
    """``.npy`` bytes -> (C, h, w) float32; None if not a finite 3-d float array."""
    array = np.load(io.BytesIO(data), allow_pickle=False)
    if array.ndim != 3 or array.dtype not in (np.float16, np.float32):
        return None
    tensor = torch.from_numpy(array.astype(np.float32))  # (C, h, w)
    return tensor if bool(torch.isfinite(tensor).all()) else None


def raw_samples(urls: list[str], counter: SkipCounter) -> Iterator[dict[str, Any]]:
    """Undecoded samples ({"__key__", ext: bytes}) of the shards in order; unreadable tar members are counted."""

    def handler(exn: Exception) -> bool:
        counter.add("read_error", detail=f"({type(exn).__name__}: {exn}) ")
        return True

    yield from wds.tariterators.tarfile_samples([{"url": u} for u in urls], handler=handler)


def decode_embedding(data: bytes) -> torch.Tensor | None:
    """``.npy`` bytes -> (L, D) float32 token embeddings; None if not a finite non-empty 2-d float array."""
    array = np.load(io.BytesIO(data), allow_pickle=False)
    if array.ndim != 2 or array.shape[0] == 0 or array.dtype not in (np.float16, np.float32):
        return None
    tensor = torch.from_numpy(array.astype(np.float32))
    return tensor if bool(torch.isfinite(tensor).all()) else None


def pad_embeddings(embs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """[(L_i, D)] -> context (B, L_max, D) zero-padded and context_mask (B, L_max), True on real tokens."""
    length = max(e.shape[0] for e in embs)
    context = torch.zeros(len(embs), length, embs[0].shape[1])
    mask = torch.zeros(len(embs), length, dtype=torch.bool)
    for i, e in enumerate(embs):
        context[i, : e.shape[0]] = e
        mask[i, : e.shape[0]] = True
    return context, mask


class ShardDataset(IterableDataset):
    """Yields ready batches: {"image" (B, 3, S, S) | "latent" (B, C, h, w), "txt", "__key__", "skipped"[, "cls"]}."""

    def __init__(
        self,
        urls: list[str],
        kind: str,
        batch_size: int,
        num_batches: int,
        image_size: int = 32,
        seed: int = 0,
        shuffle: bool = True,
        shuffle_buffer: int = 500,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got '{kind}'")
        if not urls:
            raise ValueError(
                "ShardDataset got no shard urls: pass expand_urls('data/train-{000000..000009}.tar')"
            )
        if batch_size < 1 or num_batches < 0:
            raise ValueError(f"need batch_size >= 1 and num_batches >= 0, got {batch_size}, {num_batches}")
        self.urls = list(urls)
        self.kind = kind
        self.batch_size = batch_size
        self.num_batches = num_batches
        self.image_size = image_size
        self.seed = seed
        self.shuffle = shuffle
        self.shuffle_buffer = shuffle_buffer
        self.rank, self.world_size = resolve_rank(rank, world_size)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_batches

    # ---------------------------------------------------------------- splitting
    def _worker(self) -> tuple[int, int]:
        info = get_worker_info()
        return (0, 1) if info is None else (info.id, info.num_workers)

    def _quota(self, worker: int, num_workers: int) -> int:
        """This worker's share of the rank's ``num_batches`` (the DataLoader interleaves workers)."""
        return self.num_batches // num_workers + int(worker < self.num_batches % num_workers)

    def _passes(
        self, rng: random.Random, consumer: int, consumers: int
    ) -> Iterator[tuple[list[str], int | None]]:
        """Endless passes over this consumer's shards: (shard order, sample stride filter or None)."""
        # Fewer shards than consumers: every consumer reads all shards and keeps every n-th sample.
        by_shard = len(self.urls) >= consumers
        shared_rng = random.Random(_seed(self.seed, self.epoch))  # same order on every consumer
        while True:
            if by_shard:
                mine = self._my_shards(consumer, consumers)
                yield (rng.sample(mine, len(mine)) if self.shuffle else mine), None
            else:
                order = shared_rng.sample(self.urls, len(self.urls)) if self.shuffle else self.urls
                yield order, consumer

    def _my_shards(self, consumer: int, consumers: int) -> list[str]:
        num_workers = consumers // self.world_size
        worker = consumer - self.rank * num_workers
        return self.urls[self.rank :: self.world_size][worker::num_workers]

    # ---------------------------------------------------------------- samples
    def _raw_samples(self, urls: list[str], counter: SkipCounter) -> Iterator[dict[str, Any]]:
        yield from raw_samples(urls, counter)

    def _decode(self, raw: dict[str, Any], counter: SkipCounter) -> dict[str, Any] | None:
        if "txt" not in raw:
            counter.add("missing_caption")
            return None
        try:
            sample: dict[str, Any] = {"__key__": raw["__key__"], "txt": raw["txt"].decode("utf-8")}
        except UnicodeDecodeError:
            counter.add("decode_error", detail=f"(key {raw['__key__']}: caption is not UTF-8) ")
            return None
        if "cls" in raw:
            try:
                sample["cls"] = int(raw["cls"].decode("utf-8").strip())
            except ValueError:
                counter.add("bad_label")
                return None
        if self.kind == "images":
            ext = next((e for e in IMAGE_EXTS if e in raw), None)
            if ext is None:
                counter.add("missing_image")
                return None
            try:
                sample["image"] = decode_image(raw[ext], self.image_size)
            except (OSError, ValueError, Image.DecompressionBombError):
                counter.add("decode_error", detail=f"(key {raw['__key__']}) ")
                return None
            return sample
        if "latent.npy" not in raw:
            counter.add("missing_latent")
            return None
        try:
            latent = decode_latent(raw["latent.npy"])
        except (OSError, ValueError, EOFError):
            latent = None
        if latent is None:
            counter.add("bad_latent", detail=f"(key {raw['__key__']}: need a finite fp16 (C, h, w) array) ")
            return None
        sample["latent"] = latent
        if (
            "emb.npy" in raw
        ):  # precomputed frozen text-encoder output for the caption: (L_i, D), real tokens only
            emb = decode_embedding(raw["emb.npy"])
            if emb is None:
                counter.add(
                    "bad_embedding", detail=f"(key {raw['__key__']}: need a finite fp16 (L, D) array) "
                )
                return None
            sample["emb"] = emb
        return sample

    def _samples(
        self, rng: random.Random, consumer: int, consumers: int, counter: SkipCounter
    ) -> Iterator[dict | None]:
        """Endless decoded samples for this consumer (cycling its shards); None marks the end of a pass."""
        shape: torch.Size | None = None
        for urls, stride_id in self._passes(rng, consumer, consumers):
            produced = 0
            for index, raw in enumerate(self._raw_samples(urls, counter)):
                if stride_id is not None and index % consumers != stride_id:
                    continue
                sample = self._decode(raw, counter)
                if sample is None:
                    continue
                if self.kind == "latents":
                    shape = shape or sample["latent"].shape
                    if sample["latent"].shape != shape:
                        counter.add(
                            "bad_latent", detail=f"(shape {tuple(sample['latent'].shape)} != {tuple(shape)}) "
                        )
                        continue
                produced += 1
                yield sample
            if produced == 0:
                raise RuntimeError(
                    f"rank {self.rank} consumer {consumer} read no valid sample from {urls} (skipped "
                    f"{counter.as_dict()}): check the shards, or use fewer dataloader workers"
                )
            yield None

    def _shuffled(self, samples: Iterator[dict | None], rng: random.Random) -> Iterator[dict]:
        """Buffer shuffle, flushed at the end of every pass: each sample comes once per pass over the shards."""
        buffer: list[dict] = []
        for sample in samples:
            if sample is None:  # end of a pass
                rng.shuffle(buffer)
                yield from buffer
                buffer = []
                continue
            if not self.shuffle or self.shuffle_buffer <= 1:
                yield sample
                continue
            if len(buffer) < self.shuffle_buffer:
                buffer.append(sample)
                continue
            i = rng.randrange(len(buffer))
            buffer[i], sample = sample, buffer[i]
            yield sample

    def _collate(self, samples: list[dict], skipped: dict[str, int]) -> dict[str, Any]:
        field = "image" if self.kind == "images" else "latent"
        batch: dict[str, Any] = {
            field: torch.stack([s[field] for s in samples]),  # (B, 3, S, S) or (B, C, h, w)
            "txt": [s["txt"] for s in samples],
            "__key__": [s["__key__"] for s in samples],
            "skipped": skipped,
        }
        embedded = sum("emb" in s for s in samples)
        if embedded == len(samples):
            batch["context"], batch["context_mask"] = pad_embeddings([s["emb"] for s in samples])
        elif embedded:
            log.warning(
                "batch mixes samples with and without precomputed embeddings: embeddings dropped for this batch"
            )
        labelled = sum("cls" in s for s in samples)
        if labelled == len(samples):
            batch["cls"] = torch.tensor([s["cls"] for s in samples], dtype=torch.long)  # (B,)
        elif labelled:
            log.warning("batch mixes samples with and without 'cls': labels dropped for this batch")
        return batch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker, num_workers = self._worker()
        quota = self._quota(worker, num_workers)
        if quota == 0:
            return
        consumers = self.world_size * num_workers
        consumer = self.rank * num_workers + worker
        rng = random.Random(_seed(self.seed, self.epoch, self.rank, worker))
        counter = SkipCounter(f"shards[rank {self.rank} worker {worker}]")
        stream = self._shuffled(self._samples(rng, consumer, consumers, counter), rng)
        pending: list[dict] = []
        for sample in stream:
            pending.append(sample)
            if len(pending) == self.batch_size:
                yield self._collate(pending, counter.pop())
                pending = []
                quota -= 1
                if quota == 0:
                    break
        if counter.total():
            log.info("%s: skipped after the last batch of the epoch: %s", counter.name, counter.as_dict())


_SHARD_NAME = re.compile(r"^(?P<prefix>.+)-\d+\.tar$")


def index_path_for(url: str) -> Path | None:
    """``dir/train-000003.tar`` -> ``dir/train.json`` (None for remote urls or other names)."""
    match = _SHARD_NAME.match(Path(url).name)
    if _is_remote(url) or match is None:
        return None
    return Path(url.removeprefix("file://")).parent / f"{match['prefix']}.json"
