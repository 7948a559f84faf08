"""Lightning DataModule over image or latent shards (see ``ldm.data.shard_dataset.ShardDataset``).

Shards may be local, ``pipe:`` commands or s3/gs/http(s) urls (``ldm.data.urls``). On every rank the module
totals the samples the loader skipped, per reason and per shard, writes them to
``data_bad_shards_rank{r}.json`` in the run directory, and stops the run with the worst shards named once more
than ``max_bad_fraction`` of the samples read were bad.

The data position is part of every checkpoint (``state_dict``: the train epoch and how many of its batches
each rank trained on, counted as batches reach the training step). A run resumed mid-epoch starts that epoch's
loader past those batches (``ShardDataset.set_epoch(epoch, skip_batches)``), so it trains on the samples the
uninterrupted run would have; ``restore_position=False`` restarts the epoch's order from its first batch
instead.

Loader settings that depend on the machine: ``num_workers="auto"`` is one worker per spare core of this rank
(``resolve_num_workers``), an explicit count above the cores this process may use is lowered to them (what
PyTorch's "suggested max number of worker" warning asks for); ``pin_memory="auto"`` pins batches when the
trainer's device is an accelerator (on the CPU pinning is a no-op that PyTorch warns about);
``worker_dtype="float16"`` makes the workers send the float tensors of each batch (latents, embeddings,
images) as float16, half the bytes through shared memory, and the main process casts them back to float32
after the device transfer (lossless for fp16 latent shards and their embeddings; images in [-1, 1] round to
within 2.4e-4, a sixteenth of an 8-bit step).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
from lightning.fabric.utilities.seed import pl_worker_init_function
from torch.utils.data import DataLoader

from ldm.data.bad_samples import BadSampleGuard
from ldm.data.buckets import as_latent_shapes
from ldm.data.decode import NO_LATENT_SHAPE
from ldm.data.loader_settings import (
    check_transfer_settings,
    resolve_num_workers,
    resolve_pin_memory,
    to_float16,
    to_float32,
)
from ldm.data.plan import check_mode
from ldm.data.rgb import parse_background
from ldm.data.shard_dataset import ShardDataset, meta_latent_shape, resolve_rank
from ldm.data.urls import count_samples, expand_urls, load_index, merged_commands, shard_name

log = logging.getLogger(__name__)


def index_counts(urls: list[str], commands: dict[str, str]) -> tuple[list[int] | None, dict]:
    """Samples per shard and the meta from the index beside the shards; (None, {}) without a usable index."""
    try:
        index = load_index(urls[0], commands)
    except (OSError, ValueError) as exn:
        log.info("no shard index read beside %s (%s)", urls[0], exn)
        return None, {}
    counts = dict(zip(index["shards"], index["counts"], strict=False))
    names = [shard_name(u) for u in urls]
    found = [int(counts[n]) for n in names if n in counts]
    return (found if len(found) == len(names) else None), index.get("meta", {})


def total_samples(urls: list[str], counts: list[int] | None, commands: dict[str, str], name: str) -> int:
    """The index's sample count, else counted from the shards (raises naming ``name`` when it cannot)."""
    return sum(counts) if counts else count_samples(urls, commands, name)[0]


def init_worker(worker_id: int) -> None:
    """DataLoader workers ignore the stop signals: Ctrl+C or a scheduler's SIGTERM to the whole process group
    must reach the trainer alone, which finishes its step, saves and shuts the workers down itself (a worker
    whose parent dies exits on its own). Lightning's per-worker seeding still runs."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)
    if int(os.environ.get("PL_SEED_WORKERS", "0")):
        pl_worker_init_function(worker_id)


class ShardDataModule(L.LightningDataModule):
    """Train (seeded shuffle, equal batches per rank) and val (fixed order) loaders over shards."""

    def __init__(
        self,
        train_shards: str,
        val_shards: str | None = None,
        kind: str = "latents",
        batch_size: int = 64,
        num_workers: int | str = 0,
        image_size: int = 32,
        seed: int = 0,
        shuffle_buffer: int = 500,
        train_samples: int | None = None,
        val_samples: int | None = None,
        latent_shape: Sequence[int] | None = None,
        latent_dtype: str | None = None,
        max_caption_chars: int | None = 1000,
        max_bad_fraction: float | None = 0.01,
        bad_fraction_min_samples: int = 1000,
        url_commands: dict[str, str] | None = None,
        mode: str = "exact",
        restore_position: bool = True,
        alpha_background: str | Sequence[int] = "white",
        pin_memory: bool | str = "auto",
        worker_dtype: str = "float32",
    ) -> None:
        """``alpha_background``: the colour behind transparent pixels of image shards (white, black, #rrggbb,
        r,g,b; ``ldm.data.rgb``). ``num_workers``, ``pin_memory``, ``worker_dtype``: see the module
        docstring."""
        super().__init__()
        self.pin_memory, self.worker_dtype = check_transfer_settings(pin_memory, worker_dtype)
        self.mode = check_mode(mode)
        self.restore_position = restore_position
        # (train epoch, batches of it whose optimizer step is in the weights), the batches handed to training
        # this epoch, and the optimizer step at which ``position`` was last brought up to ``fetched`` (see
        # _commit)
        self.position = (0, 0)
        self.fetched = 0
        self.committed_step = 0
        self.committed_guard: dict[str, Any] = {}
        self.resume_position: tuple[int, int] | None = None
        self.described = ""
        self.train_shards = train_shards
        self.val_shards = val_shards
        self.kind = kind
        self.batch_size = batch_size
        self.requested_workers = num_workers
        self.num_workers = resolve_num_workers(num_workers)  # again in setup, per rank of the trainer's node
        self.image_size = image_size
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.train_samples = train_samples
        self.val_samples = val_samples
        self.max_caption_chars = max_caption_chars
        self.alpha_background = parse_background(alpha_background)
        self.url_commands = dict(url_commands) if url_commands else {}
        commands = merged_commands(self.url_commands)
        self.train_urls = expand_urls(train_shards)
        self.val_urls = expand_urls(val_shards) if val_shards else []
        # who made the shards (and their latent shape), and the samples per shard the data plan balances
        self.train_counts, self.index_meta = index_counts(self.train_urls, commands)
        if train_samples is None:
            self.train_samples = total_samples(self.train_urls, self.train_counts, commands, "train_samples")
        self.val_counts = index_counts(self.val_urls, commands)[0] if self.val_urls else None
        if self.val_urls and val_samples is None:
            self.val_samples = total_samples(self.val_urls, self.val_counts, commands, "val_samples")
        meta_shape = meta_latent_shape(self.index_meta)  # one per bucket, or the one
        self.latent_shape = as_latent_shapes(latent_shape if latent_shape is not None else meta_shape)
        # batches need known shapes: none is taken from whichever sample a worker reads first
        if kind == "latents" and self.latent_shape is None:
            raise ValueError(NO_LATENT_SHAPE)
        self.latent_dtype = latent_dtype if latent_dtype is not None else self.index_meta.get("latent_dtype")
        # class names of labelled shards (batch["cls"] holds ids into them; ldm.data.labels), else None
        self.label_names: list[str] | None = self.index_meta.get("labels")
        self.guard = BadSampleGuard(max_bad_fraction, bad_fraction_min_samples)
        self.train_dataset: ShardDataset | None = None
        self.val_dataset: ShardDataset | None = None

    def _rank_world(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is None:
            return resolve_rank(None, None)  # torch.distributed when initialised, else 0 / 1
        return trainer.global_rank, trainer.world_size

    def _dataset(
        self, urls: list[str], samples: int, counts: list[int] | None, train: bool, mode: str | None = None
    ) -> ShardDataset:
        """Train: ``mode``, shuffled. Validation: exact, in shard order (each sample at most once)."""
        rank, world = self._rank_world()
        mode = mode or (self.mode if train else "exact")
        num_batches = max(1, samples // (world * self.batch_size))
        return ShardDataset(
            urls,
            kind=self.kind,
            batch_size=self.batch_size,
            num_batches=num_batches,
            image_size=self.image_size,
            seed=self.seed,
            shuffle=train,
            shuffle_buffer=self.shuffle_buffer,
            rank=rank,
            world_size=world,
            latent_shape=self.latent_shape,
            latent_dtype=self.latent_dtype,
            max_caption_chars=self.max_caption_chars,
            url_commands=self.url_commands,
            mode=mode,
            shard_counts=counts,
            num_workers=self.num_workers,
            alpha_background=self.alpha_background,
        )

    def setup(self, stage: str | None = None) -> None:
        """Builds the datasets for this rank (again if the rank changed, e.g. set up before DDP started)."""
        placement = self._rank_world()
        self.guard.rank = placement[0]
        local = self.trainer.num_devices if self.trainer is not None else 1  # ranks on this node
        self.num_workers = resolve_num_workers(self.requested_workers, local)
        if (
            self.train_dataset is None
            or (self.train_dataset.rank, self.train_dataset.world_size) != placement
        ):
            self.train_dataset = self._dataset(
                self.train_urls, int(self.train_samples), self.train_counts, True
            )
            self._describe(self.train_dataset, placement[0])
        if self.val_urls and (
            self.val_dataset is None or (self.val_dataset.rank, self.val_dataset.world_size) != placement
        ):
            self.val_dataset = self._dataset(self.val_urls, int(self.val_samples), self.val_counts, False)
            if (
                len(self.val_dataset) == 0
            ):  # too small for one whole batch per worker: one batch, samples repeat
                log.warning(
                    "validation: %d samples over %d rank(s) x %d worker(s) fill no batch of %d per worker; "
                    "validating on one batch per rank with repeated samples (lower data.batch_size or "
                    "data.num_workers, or add validation shards)",
                    self.val_samples,
                    placement[1],
                    max(1, self.num_workers),
                    self.batch_size,
                )
                self.val_dataset = self._dataset(
                    self.val_urls, int(self.val_samples), self.val_counts, False, "cycle"
                )

    def set_epoch(self, epoch: int) -> None:
        """Reseeds the train shuffle, for loops without a Trainer (scripts, tests). Under a Trainer
        ``train_dataloader`` sets the epoch, and the resumed batch position, itself: calling this from a hook
        would undo a mid-epoch resume, so it raises there."""
        if self.trainer is not None:
            raise RuntimeError(
                "ShardDataModule.set_epoch is for loops without a Trainer: under one, train_dataloader sets "
                "the epoch (and a resumed run's position); remove the call"
            )
        if self.train_dataset is not None:
            self.train_dataset.set_epoch(epoch)

    def _loader(self, dataset: ShardDataset) -> DataLoader:
        half = self.worker_dtype == "float16" and self.num_workers > 0
        device_type = self.trainer.strategy.root_device.type if self.trainer is not None else None
        return DataLoader(
            dataset,
            batch_size=None,
            num_workers=self.num_workers,
            persistent_workers=False,
            worker_init_fn=init_worker if self.num_workers else None,
            pin_memory=resolve_pin_memory(self.pin_memory, device_type),
            collate_fn=to_float16 if half else None,
        )

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Float16 tensors a worker sent (``worker_dtype``) back to float32, on the device (after the
        copy)."""
        return to_float32(batch) if self.worker_dtype == "float16" else batch

    def _describe(self, dataset: ShardDataset, rank: int) -> None:
        """Logs the plan once (rank 0); stops when the train data cannot fill one batch per rank."""
        line = dataset.describe()
        if len(dataset) == 0:
            raise ValueError(
                f"{line}: not one batch per rank; lower data.batch_size or data.num_workers, or use "
                "data.mode=resampled"
            )
        if rank == 0 and line != self.described:
            log.info(line)
        self.described = line

    def train_dataloader(self) -> DataLoader:
        """The loader of the trainer's epoch; a resumed run's first one starts past the batches already
        trained on."""
        self.setup("fit")
        if self.trainer is not None:  # a resumed run starts at its own epoch's order
            epoch, skip = self.trainer.current_epoch, 0
            resume = self.resume_position
            if resume is not None and resume[0] == epoch:
                skip = min(resume[1], len(self.train_dataset))
                log.info(
                    "epoch %d resumes at batch %d of %d (data position from the checkpoint)",
                    epoch,
                    skip,
                    len(self.train_dataset),
                )
            # used, or (an earlier epoch) already finished: later loaders start at their first batch
            if resume is not None and resume[0] <= epoch:
                self.resume_position = None
            self.train_dataset.set_epoch(epoch, skip)
            self._start_epoch(epoch, skip)
        return self._loader(self.train_dataset)

    def val_dataloader(self) -> DataLoader | list:
        self.setup("validate")
        return self._loader(self.val_dataset) if self.val_dataset is not None else []

    # ---------------------------------------------------------------- bad samples on this rank
    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Totals the training batches' skipped samples; stops the run past ``max_bad_fraction``."""
        if self.trainer is not None and self.trainer.training and isinstance(batch, dict):
            # the batches before this one are in the weights if the optimizer has stepped since
            self._commit()
            self.fetched += (
                1  # this batch is about to be trained on; it counts once its optimizer step is taken
            )
            self.guard.update(batch)
            try:
                self.guard.check()
            except RuntimeError:
                self.write_report()
                raise
        return batch

    def write_report(self) -> Path | None:
        """``data_bad_shards_rank{r}.json`` in the run directory: samples read, skipped per reason and
        shard."""
        if self.trainer is None:
            return None
        path = Path(self.trainer.default_root_dir) / f"data_bad_shards_rank{self.trainer.global_rank}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.guard.summary(), indent=1))
        return path

    def teardown(self, stage: str) -> None:
        if stage == "fit":
            self.write_report()

    # ---------------------------------------------------------------- the data position in checkpoints
    def _placement(self) -> dict[str, Any]:
        world = self._rank_world()[1]
        return {
            "mode": self.mode,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "num_workers": self.num_workers,
            "world_size": world,
        }

    def _start_epoch(self, epoch: int, skip: int) -> None:
        self.position, self.fetched = (epoch, skip), skip
        self.committed_guard = self.guard.state()  # every batch fetched before this epoch was trained
        self.committed_step = self.trainer.global_step if self.trainer is not None else 0

    def _commit(self) -> None:
        """Count the fetched batches as trained once the optimizer has stepped after them.

        A batch is counted when it is handed to training, but it is in the weights only after its optimizer
        step (the last micro-batch's, under gradient accumulation). A checkpoint taken between the two (an
        exception in the forward pass, a signal mid-step) must not count it, or the resumed run would skip it.
        """
        step = self.trainer.global_step if self.trainer is not None else self.committed_step
        if step != self.committed_step:
            self.position = (self.position[0], self.fetched)
            self.committed_step = step
            self.committed_guard = self.guard.state()  # the bad-sample totals of those same batches

    def state_dict(self) -> dict[str, Any]:
        """Saved in every checkpoint: the train epoch, how many of its batches are in the saved weights (per
        rank), and what the order depends on."""
        self._commit()
        return {
            "epoch": self.position[0],
            "batches": self.position[1],
            "bad_samples": self.committed_guard,
            **self._placement(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Called on resume, before the first train loader is built: that loader starts past the saved
        position."""
        if "batches" not in state:
            return
        if state.get("bad_samples"):
            self.guard.load(state["bad_samples"])
            self.committed_guard = self.guard.state()
        if not self.restore_position:
            log.info("data.restore_position=false: the resumed epoch restarts its order from the first batch")
            return
        self.resume_position = (int(state["epoch"]), int(state["batches"]))
        saved = {k: state.get(k) for k in self._placement()}
        if saved != self._placement():
            log.warning(
                "the data position was saved with %s but this run has %s: the resumed epoch skips %d batches "
                "of another order, so some samples may repeat or be missed until the epoch ends",
                saved,
                self._placement(),
                self.resume_position[1],
            )
        if self.train_dataset is not None and self.train_dataset.epoch == self.resume_position[0]:
            # a loader built before the restore (the trainer estimating its steps) keeps this dataset
            skip = min(self.resume_position[1], len(self.train_dataset))
            self.train_dataset.set_epoch(self.resume_position[0], skip)
            self._start_epoch(self.resume_position[0], skip)
        # the position is restored here, not by the DataLoader, so Lightning's warning does not apply
        warnings.filterwarnings(
            "ignore", message=r"You're resuming from a checkpoint that ended before the epoch"
        )
