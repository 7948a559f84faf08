"""Lightning DataModule over image or latent shards (see ``ldm.data.pipeline.ShardDataset``)."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
from torch.utils.data import DataLoader

from ldm.data.pipeline import ShardDataset, expand_urls, index_path_for, resolve_rank
from ldm.data.shards import read_index

log = logging.getLogger(__name__)


def _count_from_index(urls: list[str], arg_name: str) -> tuple[int, dict]:
    """Sums the index counts of the selected shards; returns (samples, index meta)."""
    index_file = index_path_for(urls[0])
    if index_file is None or not index_file.is_file():
        raise FileNotFoundError(
            f"No shard index next to '{urls[0]}' (expected {index_file}): pass {arg_name}=<number of samples>"
        )
    index = read_index(str(index_file))
    counts = dict(zip(index["shards"], index["counts"], strict=True))
    missing = [u for u in urls if Path(u).name not in counts]
    if missing:
        raise ValueError(f"Shards {missing[:3]} are not in {index_file}: pass {arg_name}=<number of samples>")
    return sum(counts[Path(u).name] for u in urls), index["meta"]


class ShardDataModule(L.LightningDataModule):
    """Train (seeded shuffle, equal batches per rank) and val (fixed order) loaders over shards."""

    def __init__(
        self,
        train_shards: str,
        val_shards: str | None = None,
        kind: str = "latents",
        batch_size: int = 64,
        num_workers: int = 0,
        image_size: int = 32,
        seed: int = 0,
        shuffle_buffer: int = 500,
        train_samples: int | None = None,
        val_samples: int | None = None,
    ) -> None:
        super().__init__()
        self.train_shards = train_shards
        self.val_shards = val_shards
        self.kind = kind
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.image_size = image_size
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.train_samples = train_samples
        self.val_samples = val_samples
        self.train_urls = expand_urls(train_shards)
        self.val_urls = expand_urls(val_shards) if val_shards else []
        self.index_meta: dict = {}
        if train_samples is None:
            self.train_samples, self.index_meta = _count_from_index(self.train_urls, "train_samples")
        elif (index_file := index_path_for(self.train_urls[0])) is not None and index_file.is_file():
            self.index_meta = read_index(str(index_file))[
                "meta"
            ]  # who made the shards, even with a given count
        if self.val_urls and val_samples is None:
            self.val_samples, _ = _count_from_index(self.val_urls, "val_samples")
        self.train_dataset: ShardDataset | None = None
        self.val_dataset: ShardDataset | None = None

    def _rank_world(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is None:
            return resolve_rank(None, None)  # torch.distributed when initialised, else 0 / 1
        return trainer.global_rank, trainer.world_size

    def _dataset(self, urls: list[str], samples: int, shuffle: bool) -> ShardDataset:
        rank, world = self._rank_world()
        num_batches = max(1, samples // (world * self.batch_size))
        return ShardDataset(
            urls, kind=self.kind, batch_size=self.batch_size, num_batches=num_batches,
            image_size=self.image_size, seed=self.seed, shuffle=shuffle,
            shuffle_buffer=self.shuffle_buffer, rank=rank, world_size=world,
        )  # fmt: skip

    def setup(self, stage: str | None = None) -> None:
        """Builds the datasets for this rank (again if the rank changed, e.g. set up before DDP started)."""
        placement = self._rank_world()
        if (
            self.train_dataset is None
            or (self.train_dataset.rank, self.train_dataset.world_size) != placement
        ):
            self.train_dataset = self._dataset(self.train_urls, int(self.train_samples), shuffle=True)
        if self.val_urls and (
            self.val_dataset is None or (self.val_dataset.rank, self.val_dataset.world_size) != placement
        ):
            self.val_dataset = self._dataset(self.val_urls, int(self.val_samples), shuffle=False)

    def set_epoch(self, epoch: int) -> None:
        """Reseeds the train shuffle (call from the LightningModule's on_train_epoch_start)."""
        if self.train_dataset is not None:
            self.train_dataset.set_epoch(epoch)

    def _loader(self, dataset: ShardDataset) -> DataLoader:
        return DataLoader(dataset, batch_size=None, num_workers=self.num_workers, persistent_workers=False)

    def train_dataloader(self) -> DataLoader:
        self.setup("fit")
        if self.trainer is not None:  # a resumed run starts at its own epoch's order
            self.train_dataset.set_epoch(self.trainer.current_epoch)
        return self._loader(self.train_dataset)

    def val_dataloader(self) -> DataLoader | list:
        self.setup("validate")
        return self._loader(self.val_dataset) if self.val_dataset is not None else []
