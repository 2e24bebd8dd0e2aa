"""Data layer: WebDataset shards, the embedded digits set and the shard DataModules."""

from .base import ShardsDataModule
from .digits import default_cache_dir, ensure_digits_shards, write_digits_shards
from .image_writer import list_images, write_image_shards
from .images import DigitsDataModule, ImageShardsDataModule
from .latents import LatentDecoder, LatentShardsDataModule, encode_latent_shards
from .moving_digits import (
    MovingDigitsDataModule,
    encode_gray_mp4,
    ensure_moving_digits_shards,
    render_moving_digits,
    write_moving_digits_shards,
)
from .faults import DataFault, SkipCounter
from .loaders import Interrupted
from .reading import check_shards_readable
from .shards import (
    check_local_shards,
    expand_urls,
    lookup_shard_counts,
    read_manifest,
    write_manifest,
    write_shards,
)
from .streams import EvalStream, ImageDecoder, ResampledTrainStream, eval_batch_plan
from .video import VideoDecoder, VideoShardsDataModule
from .video_writer import probe_video, write_video_shards

__all__ = [
    "DataFault",
    "DigitsDataModule",
    "EvalStream",
    "ImageDecoder",
    "ImageShardsDataModule",
    "Interrupted",
    "LatentDecoder",
    "LatentShardsDataModule",
    "MovingDigitsDataModule",
    "ResampledTrainStream",
    "ShardsDataModule",
    "SkipCounter",
    "VideoDecoder",
    "VideoShardsDataModule",
    "check_local_shards",
    "check_shards_readable",
    "default_cache_dir",
    "encode_gray_mp4",
    "encode_latent_shards",
    "ensure_digits_shards",
    "ensure_moving_digits_shards",
    "eval_batch_plan",
    "expand_urls",
    "list_images",
    "lookup_shard_counts",
    "probe_video",
    "read_manifest",
    "render_moving_digits",
    "write_digits_shards",
    "write_image_shards",
    "write_manifest",
    "write_moving_digits_shards",
    "write_shards",
    "write_video_shards",
]
