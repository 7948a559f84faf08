"""Reading WebDataset shards into ready batches: split by rank and worker, seeded shuffle, equal batch counts.

Every rank yields the same number of batches per epoch whatever the shard count, so DDP never hangs on uneven
shards; which pieces of which shards each rank and worker reads, and how many batches it yields, is the data
plan of ``ldm.data.plan`` (modes ``exact``, ``resampled``, ``cycle``), a pure function of (seed, epoch). A
resumed run starts mid-epoch with ``set_epoch(epoch, skip_batches)``: each worker forms again the batches its
rank already trained on and drops them uncollated. Shards are read by ``ldm.data.tar_reader`` from any source
``ldm.data.urls`` opens; samples are checked by ``ldm.data.decode``. Skipped samples are counted per reason
and per shard and reported with each batch under ``"skipped"`` and ``"skipped_shards"``, with the samples read
under ``"read"``.
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
from ldm.data.decode import SampleDecoder
from ldm.data.plan import Piece, Plan, check_mode, make_plan, resume_rotation, worker_share
from ldm.data.shards import SkipCounter
from ldm.data.tar_reader import raw_samples
from ldm.data.urls import load_index, merged_commands

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
    """[(L_i, D)] -> context (B, L_max, D) float32 zero-padded and context_mask (B, L_max), True on real
    tokens.

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


def meta_latent_shape(meta: dict[str, Any]) -> Any:
    """The latent shape(s) a shard index meta records: one per bucket ("latent_shapes"), or the one; else
    None."""
    return meta.get("latent_shapes") or meta.get("latent_shape")


def index_latent_shape(urls: list[str], commands: dict[str, str]) -> Any:
    """The latent shape(s) in the index beside the shards; None without an index or a shape in its meta."""
    try:
        meta = load_index(urls[0], commands)["meta"]
    except (OSError, ValueError) as exn:
        log.info("no shard index read beside %s (%s)", urls[0], exn)
        return None
    return meta_latent_shape(meta)


class ShardDataset(IterableDataset):
    """Yields ready batches: {"image" (B, 3, S, S) | "latent" (B, C, h, w), "txt", "__key__", "skipped"[,
    "cls"]}.

    Latent shards of aspect-ratio buckets: each batch holds one bucket's shape and adds "original_size" and
    "crop_top_left" (B, 2); see ``ldm.data.buckets.bucket_batches`` for what bucketing does to the order.

    ``read`` is how many samples this worker read since its previous batch (good and bad, each once per epoch:
    re-reads of a piece in the same epoch do not count; the shuffle buffer's read-ahead does), ``skipped`` how
    many of them were dropped per reason and ``skipped_shards`` the same per shard ({shard: {reason: n}}), so
    that summed over batches skipped / read is the bad fraction of the samples read; see ``ldm.data.decode``
    and ``ldm.data.tar_reader`` for the reasons.
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
        mode: str = "exact",
        shard_counts: Sequence[int] | None = None,
        num_workers: int = 0,
        alpha_background: str | Sequence[int] = "white",
    ) -> None:
        """``num_batches``: batches per rank and epoch (exact mode: at most). ``shard_counts``: samples per
        shard (the shard index); ``num_workers``: the DataLoader's, for ``len()`` (see ``ldm.data.plan``).
        ``latent_shape`` (C, h, w), or one per bucket: latents of other shapes are skipped; None: from the
        shard index meta beside the shards (ValueError naming data.latent_shape when it has none).
        ``alpha_background``: the colour behind transparent image pixels (``ldm.data.rgb``)."""
        super().__init__()
        if not urls:
            raise ValueError(
                "ShardDataset got no shard urls: pass expand_urls('data/train-{000000..000009}.tar')"
            )
        if batch_size < 1 or num_batches < 0:
            raise ValueError(f"need batch_size >= 1 and num_batches >= 0, got {batch_size}, {num_batches}")
        self.commands = merged_commands(url_commands)
        if kind == "latents" and latent_shape is None:  # the decoder needs it: batches of known shapes
            latent_shape = index_latent_shape(list(urls), self.commands)
        self.decoder = SampleDecoder(
            kind, image_size, latent_shape, latent_dtype, max_caption_chars, alpha_background
        )
        self.urls = list(urls)
        self.kind = kind
        self.batch_size = batch_size
        self.num_batches = num_batches
        self.image_size = image_size
        self.seed = seed
        self.shuffle = shuffle
        self.shuffle_buffer = shuffle_buffer
        self.rank, self.world_size = resolve_rank(rank, world_size)
        self.mode = check_mode(mode)
        if shard_counts is not None and len(shard_counts) != len(self.urls):
            raise ValueError(
                f"got {len(shard_counts)} shard counts for {len(self.urls)} shards: pass one count per shard "
                f"url"
            )
        self.shard_counts = [int(n) for n in shard_counts] if shard_counts is not None else None
        self.num_workers = num_workers
        self.epoch = 0
        self.skip_batches = 0
        self.batches = self.plan(num_workers).batches  # per rank, the same every epoch

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Reseeds the order for ``epoch``; ``skip_batches``: how many of the epoch's batches this rank
        already trained on (a resumed run), which the workers form again and drop without collating."""
        if not 0 <= skip_batches <= self.batches:
            raise ValueError(f"skip_batches must be in [0, {self.batches}], got {skip_batches}")
        self.epoch, self.skip_batches = epoch, skip_batches

    def __len__(self) -> int:
        return self.batches

    def plan(self, num_workers: int) -> Plan:
        """This epoch's plan for all ranks and ``num_workers`` DataLoader workers (0: the main process)."""
        seed = _seed(self.seed, self.epoch) if self.shuffle else None
        return make_plan(
            self.mode,
            self.urls,
            self.shard_counts,
            self.world_size,
            num_workers,
            self.batch_size,
            self.num_batches,
            seed,
        )

    def describe(self) -> str:
        """One line for the log: batches per rank and epoch, and (exact) samples used and dropped per
        epoch."""
        plan = self.plan(self.num_workers)
        where = (
            f"{len(self.urls)} shards over {self.world_size} rank(s) x {max(1, self.num_workers)} worker(s)"
        )
        head = (
            f"data.mode={self.mode}: {plan.batches} batches of {self.batch_size} per rank per epoch from "
            f"{where}"
        )
        if self.mode == "resampled":
            return head + ", shards drawn with replacement"
        if self.mode == "cycle":
            return head + ", each worker cycling its own shards"
        total = sum(self.shard_counts) if self.shard_counts is not None else None
        used = plan.samples_used(self.batch_size)
        line = f"{head}: {used} of {total if total is not None else 'an unknown number of'} samples per epoch"
        if total is not None:
            line += (
                f", {total - used} ({(total - used) / max(1, total):.1%}) dropped (partial batches per "
                f"worker,"
                " ranks evened out, train_samples)"
            )
        if plan.split_shards:
            line += (
                f"; {plan.split_shards} shard(s) read by every rank, each keeping its share (split so that"
                " uneven shards leave the ranks even)"
            )
        return line

    # ---------------------------------------------------------------- splitting
    def _worker(self) -> tuple[int, int]:
        info = get_worker_info()
        return (0, 1) if info is None else (info.id, info.num_workers)

    def _passes(self, plan: Plan, worker: int, rng: random.Random) -> Iterator[list[Piece]]:
        """Passes over this worker's pieces: resampled draws one shard per pass, cycle reads its own pieces in
        a new order per pass, exact reads them once (again only when bad samples left its quota short)."""
        if plan.pieces is None:  # resampled
            while True:
                yield [(rng.choice(self.urls), 1, 0)]
        mine = plan.pieces[self.rank][worker]
        if not self.shuffle:  # the given shard order
            position = {url: i for i, url in enumerate(self.urls)}
            mine = sorted(mine, key=lambda piece: (position[piece[0]], piece[2]))
        passes = 0
        while True:
            if passes == 1 and self.mode == "exact":
                log.warning(
                    "rank %d worker %d: its shards held fewer valid samples than planned (bad samples, "
                    "partial aspect-ratio buckets, or no shard index to count them); reading them again so "
                    "that every rank yields %d batches",
                    self.rank,
                    worker,
                    plan.batches,
                )
            yield rng.sample(mine, len(mine)) if self.shuffle else mine
            passes += 1

    # ---------------------------------------------------------------- samples
    def _samples(
        self, passes: Iterator[list[Piece]], worker: int, counter: SkipCounter
    ) -> Iterator[dict | None]:
        """Decoded samples of the passes; None marks the end of a pass (not in resampled mode: one endless
        stream)."""
        empty, limit = 0, (2 * len(self.urls) + 2 if self.mode == "resampled" else 1)
        # Counted once per epoch: a piece read again in this epoch (a second pass of exact mode, every pass of
        # cycle, a shard drawn again in resampled) counts its reads and skips in ``again``, which nobody
        # reads. A shard split into stride pieces is read in full by each of its readers: its shard-level
        # damage (truncated_shard, corrupt_shard, read_error) counts only in the piece of offset 0, and each
        # sample, bad or good, only in the piece that owns it (the others do not decode it).
        elsewhere = SkipCounter(f"{counter.name} (split shard, counted by the reader of its first piece)")
        again = SkipCounter(f"{counter.name} (read again this epoch, counted the first time)")
        counted: set[Piece] = set()
        for pieces in passes:
            produced = 0
            for piece in pieces:
                url, stride, offset = piece
                owner = again if piece in counted else counter
                reader = owner if offset == 0 else elsewhere
                for index, raw in enumerate(raw_samples([url], reader, self.commands)):
                    if index % stride != offset:
                        continue
                    owner.count_read()
                    sample = self.decoder(raw, owner)
                    if sample is None:
                        continue
                    produced += 1
                    yield sample
                counted.add(piece)
            empty = 0 if produced else empty + 1
            if empty >= limit:
                raise RuntimeError(
                    f"rank {self.rank} worker {worker} read no valid sample from {[p[0] for p in pieces]} "
                    f"(skipped {counter.as_dict()}): check the shards, or use fewer dataloader workers"
                )
            if self.mode != "resampled":
                yield None

    def _shuffled(self, samples: Iterator[dict | None], rng: random.Random) -> Iterator[dict]:
        """Buffer shuffle, flushed at the end of every pass: each sample comes once per pass over the
        shards."""
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
        batch["read"] = counter.pop_reads()
        batch["skipped"] = counter.pop()
        batch["skipped_shards"] = counter.pop_shards()
        embedded = sum("emb" in s for s in samples)
        if embedded == len(samples):
            batch["context"], batch["context_mask"] = pad_embeddings([s["emb"] for s in samples])
        elif embedded:
            log.warning(
                "batch mixes samples with and without precomputed embeddings: embeddings dropped for this "
                "batch"
            )
        labelled = sum("cls" in s for s in samples)
        if labelled == len(samples):
            batch["cls"] = torch.tensor([s["cls"] for s in samples], dtype=torch.long)  # (B,)
        elif labelled:
            log.warning("batch mixes samples with and without 'cls': labels dropped for this batch")
        return batch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        loader_worker, num_workers = self._worker()
        plan = self.plan(num_workers)
        quotas = plan.quotas[self.rank]
        taken = min(self.skip_batches, plan.batches)  # already trained on (a resumed run)
        worker = (loader_worker + resume_rotation(taken, quotas)) % len(quotas)
        quota = quotas[worker]
        skip = worker_share(taken, quotas)[worker]  # its share of them, in the DataLoader's round-robin order
        if quota <= skip:
            return
        rng = random.Random(_seed(self.seed, self.epoch, self.rank, worker))
        counter = SkipCounter(f"shards[rank {self.rank} worker {worker}]")
        stream = self._shuffled(self._samples(self._passes(plan, worker, rng), worker, counter), rng)
        try:  # one shape per batch: aspect-ratio buckets fill their own batches (ldm.data.buckets)
            for samples in bucket_batches(stream, self.batch_size):
                quota -= 1
                if skip:  # trained on before the checkpoint; its reads and skips were counted then
                    skip -= 1
                    counter.pop_reads()
                    counter.pop()
                    counter.pop_shards()
                else:
                    yield self._collate(samples, counter)
                if quota == 0:
                    break
        finally:
            stream.close()  # stops any shard command still running
        if counter.total():  # the last batch is formed after the last read: only a failed epoch leaves some
            log.info("%s: skipped after the last batch of the epoch: %s", counter.name, counter.as_dict())
