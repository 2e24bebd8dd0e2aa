"""Data layer: WebDataset shards, the embedded digits set and the shard DataModules."""

from .base import ShardsDataModule
from .digits import default_cache_dir, ensure_digits_shards, write_digits_shards
from .images import DigitsDataModule, ImageShardsDataModule
from .shards import (
    SkipCounter,
    check_local_shards,
    expand_urls,
    lookup_shard_counts,
    read_manifest,
    write_manifest,
    write_shards,
)
from .streams import EvalStream, ImageDecoder, ResampledTrainStream, eval_batch_plan

__all__ = [
    "DigitsDataModule",
    "EvalStream",
    "ImageDecoder",
    "ImageShardsDataModule",
    "ResampledTrainStream",
    "ShardsDataModule",
    "SkipCounter",
    "check_local_shards",
    "default_cache_dir",
    "ensure_digits_shards",
    "eval_batch_plan",
    "expand_urls",
    "lookup_shard_counts",
    "read_manifest",
    "write_digits_shards",
    "write_manifest",
    "write_shards",
]
