"""Data: built-in sources (emoji, image folders), shard writing, the WebDataset pipeline, the DataModule."""

from ldm.data.datamodule import ShardDataModule
from ldm.data.emoji import emoji_samples, is_validation_key
from ldm.data.folder import folder_samples
from ldm.data.shard_dataset import ShardDataset
from ldm.data.shards import SkipCounter, read_index, write_shards
from ldm.data.urls import expand_urls

__all__ = [
    "ShardDataModule",
    "ShardDataset",
    "SkipCounter",
    "emoji_samples",
    "expand_urls",
    "folder_samples",
    "is_validation_key",
    "read_index",
    "write_shards",
]
