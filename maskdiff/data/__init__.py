"""Data layer: WebDataset shards, the embedded digits set and image DataModules."""

from .digits import default_cache_dir, ensure_digits_shards, write_digits_shards
from .images import DigitsDataModule, ImageShardsDataModule
from .streams import EvalStream, ImageDecoder, ResampledTrainStream, eval_batch_plan
from .shards import (
    SkipCounter,
    check_local_shards,
    expand_urls,
    lookup_shard_counts,
    read_manifest,
    write_manifest,
    write_shards,
)

__all__ = [
    "DigitsDataModule",
    "EvalStream",
    "ImageDecoder",
    "ImageShardsDataModule",
    "ResampledTrainStream",
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
