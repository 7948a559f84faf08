"""Data: built-in sources (emoji, image folders), shard writing, the WebDataset pipeline, the DataModule."""

from ldm.data.datamodule import ShardDataModule
from ldm.data.emoji import emoji_samples, is_validation_key
from ldm.data.folder import folder_samples
from ldm.data.pipeline import ShardDataset, expand_urls
from ldm.data.shards import SkipCounter, read_index, write_shards

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
