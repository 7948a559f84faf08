"""Reading WebDataset shards into ready batches: split by rank and worker, seeded shuffle, equal batch counts.

Every rank yields exactly ``num_batches`` batches per epoch whatever the shard count, so DDP never hangs on
uneven shards: a rank or worker with fewer shards cycles through its own again. Shards are read by
``ldm.data.tar_reader`` from any source ``ldm.data.urls`` opens; samples are checked by ``ldm.data.decode``.
Skipped samples are counted per reason and per shard and reported with each batch under ``"skipped"`` and
``"skipped_shards"``.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from ldm.data.buckets import bucket_batches, size_conditioning
from ldm.data.decode import IMAGE_EXTS, SampleDecoder, decode_embedding, decode_image, decode_latent
from ldm.data.shards import SkipCounter
from ldm.data.tar_reader import raw_samples
from ldm.data.urls import expand_urls, merged_commands

__all__ = [  # the names other modules import from here
    "IMAGE_EXTS",
    "ShardDataset",
    "decode_embedding",
    "decode_image",
    "decode_latent",
    "expand_urls",
    "pad_embeddings",
    "raw_samples",
    "resolve_rank",
]

log = logging.getLogger(__name__)


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


def pad_embeddings(embs: Sequence[torch.Tensor | np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """[(L_i, D)] -> context (B, L_max, D) float32 zero-padded and context_mask (B, L_max), True on real tokens.

    Padded in the stored dtype (fp16 on disk) and converted once per batch.
    """
    arrays = [e.numpy() if isinstance(e, torch.Tensor) else e for e in embs]
    lengths = [a.shape[0] for a in arrays]
    if min(lengths) == max(lengths):
        context = np.stack(arrays)
    else:
        context = np.zeros((len(arrays), max(lengths), arrays[0].shape[1]), np.result_type(*arrays))
        for i, a in enumerate(arrays):
            context[i, : a.shape[0]] = a
    mask = np.arange(context.shape[1])[None, :] < np.array(lengths)[:, None]  # (B, L_max)
    return torch.from_numpy(context).float(), torch.from_numpy(mask)


class ShardDataset(IterableDataset):
    """Yields ready batches: {"image" (B, 3, S, S) | "latent" (B, C, h, w), "txt", "__key__", "skipped"[, "cls"]}.

    Latent shards of aspect-ratio buckets: each batch holds one bucket's shape and adds "original_size" and
    "crop_top_left" (B, 2); see ``ldm.data.buckets.bucket_batches`` for what bucketing does to the order.

    ``skipped`` holds the samples dropped since the previous batch per reason, ``skipped_shards`` the same per
    shard ({shard: {reason: n}}); see ``ldm.data.decode`` and ``ldm.data.tar_reader`` for the reasons.
    """

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
        latent_shape: Sequence[int] | None = None,
        latent_dtype: str | None = None,
        max_caption_chars: int | None = 1000,
        url_commands: dict[str, str] | None = None,
    ) -> None:
        super().__init__()
        if not urls:
            raise ValueError(
                "ShardDataset got no shard urls: pass expand_urls('data/train-{000000..000009}.tar')"
            )
        if batch_size < 1 or num_batches < 0:
            raise ValueError(f"need batch_size >= 1 and num_batches >= 0, got {batch_size}, {num_batches}")
        self.decoder = SampleDecoder(kind, image_size, latent_shape, latent_dtype, max_caption_chars)
        self.urls = list(urls)
        self.kind = kind
        self.batch_size = batch_size
        self.num_batches = num_batches
        self.image_size = image_size
        self.seed = seed
        self.shuffle = shuffle
        self.shuffle_buffer = shuffle_buffer
        self.commands = merged_commands(url_commands)
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
    def _samples(
        self, rng: random.Random, consumer: int, consumers: int, counter: SkipCounter
    ) -> Iterator[dict | None]:
        """Endless decoded samples for this consumer (cycling its shards); None marks the end of a pass."""
        for urls, stride_id in self._passes(rng, consumer, consumers):
            produced = 0
            for index, raw in enumerate(raw_samples(urls, counter, self.commands)):
                if stride_id is not None and index % consumers != stride_id:
                    continue
                sample = self.decoder(raw, counter)
                if sample is None:
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

    def _collate(self, samples: list[dict], counter: SkipCounter) -> dict[str, Any]:
        if self.kind == "images":
            batch: dict[str, Any] = {"image": torch.stack([s["image"] for s in samples])}  # (B, 3, S, S)
        else:  # one stack and one conversion per batch: (B, C, h, w) stored dtype -> float32
            batch = {"latent": torch.from_numpy(np.stack([s["latent"] for s in samples])).float()}
        batch["txt"] = [s["txt"] for s in samples]
        batch["__key__"] = [s["__key__"] for s in samples]
        batch.update(size_conditioning(samples))  # bucketed shards: original_size, crop_top_left (B, 2)
        batch["skipped"] = counter.pop()
        batch["skipped_shards"] = counter.pop_shards()
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
        try:  # one shape per batch: aspect-ratio buckets fill their own batches (ldm.data.buckets)
            for samples in bucket_batches(stream, self.batch_size):
                yield self._collate(samples, counter)
                quota -= 1
                if quota == 0:
                    break
        finally:
            stream.close()  # stops any shard command still running
        if counter.total():
            log.info("%s: skipped after the last batch of the epoch: %s", counter.name, counter.as_dict())
