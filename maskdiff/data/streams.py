"""Decoding and the two ways of reading shards: resampled training streams and exactly-once evaluation streams.

The streams are generic over a *sample decoder*: any object with

- ``decoder(sample: dict, rng: random.Random | None) -> (tensor, label)``: decode one webdataset sample;
  ``rng`` is given for training (random augmentation drawn from it) and ``None`` for evaluation
  (deterministic transform);
- ``decoder.collate(list_of_pairs) -> (batch, labels (B,) int64)``, which must accept an empty list.

:class:`ImageDecoder` is the image one: batches ``(images (B, C, S, S) float32 in [-1, 1], labels (B,))``.

A :class:`~maskdiff.data.faults.SkipCounter` counts what the streams decode and skip (``read``, ``skipped``,
reasons with example keys); shards are read by :class:`~maskdiff.data.reading.ShardRead`.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable, Iterator, Sequence

import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info
from torchvision.transforms import InterpolationMode

from .faults import DataFault, SkipCounter, skip_reason
from .reading import NoSampleBound, ShardRead, shard_name
from .transforms import (
    CROPS,
    EncodedImage,
    adm_center_crop,
    adm_halvings,
    crop_resize,
    draft_factor,
    inception_crop,
    inception_crop_box,
    random_resized_crop_box,
    resize_center_crop,
    resize_small_central_crop,
    square_center_box,
    to_signed_float,
)

log = logging.getLogger("maskdiff.data")

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")
UNLABELLED = -1


class ImageDecoder:
    """Turns a webdataset sample dict into ``(image (C, S, S) uint8, label int)``; :meth:`collate` makes the
    float batch ``(B, C, S, S)`` in [-1, 1].

    The first member among ``png/jpg/jpeg/webp`` is decoded (``torchvision.io``, PIL as the fallback; see
    :mod:`.transforms`) to ``channels`` 1 (grayscale) or 3 (RGB), then cropped to ``S = image_size``:

    - ``"center"``: the largest centred square, resized bilinearly (the digits' transform);
    - ``"adm_center"``: guided-diffusion's ``center_crop_arr`` (BOX halvings, bicubic resize of the shorter
      side to S, centre crop), used by DiT and MDT, in training and evaluation;
    - ``"random_resized"``: in training, MAE's ``RandomResizedCrop(S, scale, ratio, bicubic)`` drawn from
      ``rng``; in evaluation, a bicubic resize of the shorter side to ``int(S * eval_resize_ratio)`` and a
      centre crop (MAE's evaluation transform);
    - ``"inception"``: in training, big_vision's inception crop (UMD: ``area_min`` 80 as ``scale: [0.8, 1]``,
      ``ratio: [0.75, 1.33]``): TF's ``sample_distorted_bounding_box`` box, bilinear resize without antialiasing;
      in evaluation, big_vision's ``resize_small(int(S * eval_resize_ratio))|central_crop(S)`` (UMD: ratio 1). Images
      are decoded whole (``jpeg_draft`` does not apply), as ``decode_and_crop_jpeg``.

    In training (``rng`` given), ``hflip`` mirrors half of the images. With ``jpeg_draft`` a JPEG much larger
    than its output is decoded at 1/2, 1/4 or 1/8 of its size (within a few grey levels of decoding it whole).

    The label is the integer in the ``cls`` member and must lie in ``[0, num_classes)``. A sample without
    ``cls`` is an error when ``labelled``, else gets the label -1. With ``uint8_batches``, :meth:`collate`
    keeps the images uint8 in [0, 255] (scale them with :func:`~maskdiff.data.transforms.to_signed_float`).
    """

    def __init__(
        self,
        image_size: int,
        channels: int,
        num_classes: int,
        hflip: bool = False,
        crop: str = "center",
        labelled: bool = True,
        scale: Sequence[float] = (0.2, 1.0),
        ratio: Sequence[float] = (3 / 4, 4 / 3),
        eval_resize_ratio: float = 256 / 224,
        jpeg_draft: bool = True,
        uint8_batches: bool = False,
    ):
        if crop not in CROPS:
            raise ValueError(f"crop must be one of {CROPS}, got {crop!r}")
        if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"scale must be (low, high) with 0 < low <= high <= 1, got {scale!r}")
        if len(ratio) != 2 or not 0 < ratio[0] <= ratio[1]:
            raise ValueError(f"ratio must be (low, high) with 0 < low <= high, got {ratio!r}")
        if eval_resize_ratio < 1:
            raise ValueError(f"eval_resize_ratio must be >= 1 (resize, then crop), got {eval_resize_ratio!r}")
        self.image_size = image_size
        self.channels = channels
        self.num_classes = num_classes
        self.hflip = hflip
        self.crop = crop
        self.labelled = labelled
        self.scale = tuple(scale)
        self.ratio = tuple(ratio)
        self.eval_resize_ratio = eval_resize_ratio
        self.jpeg_draft = jpeg_draft
        self.uint8_batches = uint8_batches

    @property
    def eval_resize(self) -> int:
        """Shorter side before the evaluation centre crop of ``crop="random_resized"`` or ``"inception"``."""
        return int(self.image_size * self.eval_resize_ratio + 1e-6)

    def __call__(self, sample: dict, rng: random.Random | None = None) -> tuple[torch.Tensor, int]:
        extension = next((ext for ext in IMAGE_EXTENSIONS if ext in sample), None)
        if extension is None:
            members = sorted(k for k in sample if not k.startswith("__"))
            raise KeyError(f"sample {sample.get('__key__')!r} has no {'/'.join(IMAGE_EXTENSIONS)} member: {members}")
        label = self.label(sample)
        pixels = self.pixels(sample[extension], rng)
        if rng is not None and self.hflip and rng.random() < 0.5:
            pixels = pixels.flip(-1)
        return pixels, label

    def label(self, sample: dict) -> int:
        if "cls" not in sample:
            if self.labelled:
                raise KeyError(
                    f"sample {sample.get('__key__')!r} has no 'cls' label member (labelled=False reads unlabelled shards)"
                )
            return UNLABELLED
        label = int(sample["cls"])
        if not 0 <= label < self.num_classes:
            raise ValueError(f"sample {sample.get('__key__')!r}: label {label} outside [0, {self.num_classes})")
        return label

    def pixels(self, data: bytes, rng: random.Random | None = None) -> torch.Tensor:
        """Image bytes -> cropped uint8 ``(C, S, S)`` (random crop when ``rng`` is given, no flip)."""
        image = EncodedImage(data, self.channels, reduced_decoding=self.jpeg_draft)
        height, width, size = image.height, image.width, self.image_size
        if self.crop == "adm_center":
            halvings = adm_halvings(height, width, size)
            pixels = image.decode(reduce=2 ** min(halvings, 3))
            done = round(math.log2(height / pixels.shape[-2]))
            return adm_center_crop(pixels, size, halvings=halvings - done)
        if self.crop == "inception":
            if rng is None:
                return resize_small_central_crop(image.decode(), self.eval_resize, size)
            box = inception_crop_box(height, width, self.scale, self.ratio, rng)
            return inception_crop(image.decode(), box, size)
        if self.crop == "random_resized" and rng is None:
            pixels = image.decode(reduce=draft_factor(min(height, width), self.eval_resize))
            return resize_center_crop(pixels, self.eval_resize, size)
        if self.crop == "random_resized":
            box = random_resized_crop_box(height, width, self.scale, self.ratio, rng)
            interpolation = InterpolationMode.BICUBIC
        else:
            box = square_center_box(height, width)
            interpolation = InterpolationMode.BILINEAR
        pixels = image.decode(reduce=draft_factor(min(box.height, box.width), size))
        if pixels.shape[-2:] != (height, width):
            box = box.scaled(pixels.shape[-2] / height, pixels.shape[-1] / width)
        return crop_resize(pixels, box, size, interpolation)

    def collate(self, samples: Sequence[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """``[(image (C, S, S) uint8, label)] * B -> (images (B, C, S, S) float32 in [-1, 1], labels (B,) int64)``;
        B may be 0. With ``uint8_batches`` the images stay uint8."""
        if not samples:
            shape = (0, self.channels, self.image_size, self.image_size)
            dtype = torch.uint8 if self.uint8_batches else torch.float32
            return torch.empty(shape, dtype=dtype), torch.empty(0, dtype=torch.int64)
        images, labels = zip(*samples)
        images = torch.stack(images)
        return images if self.uint8_batches else to_signed_float(images), torch.tensor(labels, dtype=torch.int64)


def _pass_through(batch):
    return batch


class ResampledTrainStream(IterableDataset):
    """Endless stream of decoded ``(image (C, S, S), label)`` samples for training.

    Each rank and worker draws shards with replacement from all ``urls`` (no node/worker splitting),
    reads them, shuffles raw samples in a ``shuffle_buffer``-sized buffer, then decodes them with a
    seeded ``random.Random`` for the decoder's augmentation. The random generator is seeded from ``(seed, rank,
    worker id, epoch)``: ``epoch`` is set in the main process before each epoch, and persistent workers (which
    hold the copy made when they started) count on from the epoch they started in, so an epoch's stream is the
    same whether the workers started with it or long before (what makes resuming exact).

    ``counter`` counts the samples decoded and skipped: a sample that fails to decode, and the samples a shard
    cut short loses (exactly when ``shard_counts``, ``url -> samples`` from the manifest, lists the shard; else
    one for the cut). The stream stops with a :class:`~maskdiff.data.faults.DataFault` naming the shards once
    every shard was read without a sample since the last one, or ``stall_timeout`` seconds passed without one
    (:class:`~maskdiff.data.reading.NoSampleBound`), or more than ``max_error_streak`` samples in a row failed
    to decode. ``name`` says what the shards are in messages.
    """

    def __init__(
        self,
        urls: Sequence[str],
        decoder: Callable,
        handler: SkipCounter,
        seed: int,
        rank: int = 0,
        shuffle_buffer: int = 1000,
        max_error_streak: int = 1000,
        shard_counts: dict[str, int] | None = None,
        stall_timeout: float | None = None,
        name: str = "training shards",
    ):
        super().__init__()
        self.urls = list(urls)
        self.decoder = decoder
        self.handler = handler
        self.seed = seed
        self.rank = rank
        self.shuffle_buffer = shuffle_buffer
        self.max_error_streak = max_error_streak
        self.shard_counts = dict(shard_counts or {})
        self.stall_timeout = stall_timeout
        self.name = name
        self.epoch = 0
        self._first_epoch: int | None = None
        self._iterations = 0

    def _raw_samples(self, shard_rng: random.Random) -> Iterator[dict]:
        bound = NoSampleBound(self.urls, self.name, self.stall_timeout)
        while True:
            shard = ShardRead(shard_rng.choice(self.urls), self.handler)
            yield from shard
            lost = shard.losses(self.shard_counts.get(shard.url))
            if lost is not None:
                self.handler.skip(lost[1], shard_name(shard.url), count=lost[0])
            bound.passed(shard)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int]]:
        worker = get_worker_info()
        if self._first_epoch is None:
            self._first_epoch = self.epoch
        epoch = self._first_epoch + self._iterations
        self._iterations += 1
        worker_id = worker.id if worker else 0
        rng = random.Random(wds.utils.make_seed(self.seed, self.rank, worker_id, epoch))
        shard_rng, shuffle_rng, augment_rng = (random.Random(rng.getrandbits(64)) for _ in range(3))
        samples = self._raw_samples(shard_rng)
        if self.shuffle_buffer > 1:
            samples = wds.shuffle(self.shuffle_buffer, initial=min(100, self.shuffle_buffer), rng=shuffle_rng)(samples)
        streak = 0
        for sample in samples:
            try:
                decoded = self.decoder(sample, augment_rng)
            except Exception as exn:
                streak += 1
                if streak > self.max_error_streak:
                    raise DataFault(
                        f"{streak} samples in a row of {self.name} failed to decode, the stream would never yield; "
                        f"the last: {skip_reason(exn, sample.get('__key__'))} ({sample.get('__key__')})"
                    ) from exn
                self.handler(exn, sample.get("__key__"))
                continue
            streak = 0
            self.handler.count_read()
            yield decoded


def eval_batch_plan(num_samples: int, world_size: int, rank: int, batch_size: int) -> list[tuple[int, int]]:
    """Global sample ranges ``[(start, stop), ...]`` of this rank's evaluation batches.

    Rank ``r`` owns the contiguous range ``[r*N//W, (r+1)*N//W)`` (sizes differ by at most one).
    Every rank gets the same number of batches, ``ceil(ceil(N/W) / batch_size)``, so DDP collectives
    stay in step; batches are full except the last ones of a rank, which may be smaller but never
    empty. Raises ``ValueError`` when some rank has fewer samples than batches.
    """
    if num_samples < 1:
        raise ValueError(f"evaluation needs at least one sample, got val_samples={num_samples}")
    if batch_size < 1:
        raise ValueError(f"val_batch_size must be >= 1, got {batch_size}")
    bounds = [r * num_samples // world_size for r in range(world_size + 1)]
    num_batches = math.ceil(math.ceil(num_samples / world_size) / batch_size)
    smallest = num_samples // world_size
    if smallest < num_batches:
        raise ValueError(
            f"val_samples={num_samples} cannot be split into {num_batches} non-empty batches on each of "
            f"world_size={world_size} ranks with val_batch_size={batch_size}; use more samples, a larger "
            "batch or val_samples divisible by world_size"
        )
    start, left = bounds[rank], bounds[rank + 1] - bounds[rank]
    plan = []
    for batch in range(num_batches):
        size = min(batch_size, left - (num_batches - batch - 1))
        plan.append((start, start + size))
        start, left = start + size, left - size
    return plan


class EvalStream(IterableDataset):
    """This rank's evaluation batches (``decoder.collate`` of b samples), each sample read once.

    Samples are numbered globally in shard order (shards in pattern order, samples in tar order);
    :func:`eval_batch_plan` assigns each rank a contiguous range cut into a fixed number of batches,
    and DataLoader workers take every ``num_workers``-th batch of it. With per-shard counts (from the
    manifest) a worker opens only the shards overlapping its batches, so reading is split by node
    and worker much like shard splitting, but it stays exact when shards are fewer than ranks or of
    unequal size. Without counts every worker scans the shards from the start up to its last sample.

    A sample that fails to decode is skipped and counted (``handler``, a
    :class:`~maskdiff.data.faults.SkipCounter`), making its batch smaller; if shards end before ``num_samples``
    the remaining batches are short or empty (``b == 0``) so that all ranks still yield the same number of
    batches. Only the first ``num_samples`` samples are used. Every sample of this reader's batches that is not
    decoded is counted as skipped with its reason, so that read + skipped is the number of samples planned:
    those a shard cut short lost (:class:`~maskdiff.data.reading.ShardRead`; with the manifest's counts, in
    place) and those past the end of the shards.
    """

    def __init__(
        self,
        urls: Sequence[str],
        shard_counts: Sequence[int] | None,
        num_samples: int,
        rank: int,
        world_size: int,
        batch_size: int,
        decoder: Callable,
        handler: SkipCounter,
    ):
        super().__init__()
        self.urls = list(urls)
        self.shard_counts = list(shard_counts) if shard_counts is not None else None
        self.num_samples = num_samples
        self.plan = eval_batch_plan(num_samples, world_size, rank, batch_size)
        self.decoder = decoder
        self.handler = handler

    def __len__(self) -> int:
        return len(self.plan)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        worker = get_worker_info()
        batches = self.plan[worker.id :: worker.num_workers] if worker else self.plan
        if batches:
            yield from self._read(batches)

    def _read(self, batches: list[tuple[int, int]]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        current: list[tuple[torch.Tensor, int]] = []
        counter = self.handler
        cursor = 0
        offset = 0
        for index_of_shard, url in enumerate(self.urls):
            if cursor == len(batches):
                break
            count = self.shard_counts[index_of_shard] if self.shard_counts is not None else None
            if count is not None and offset + count <= batches[cursor][0]:
                offset += count
                continue
            shard_start = offset
            shard = ShardRead(url, counter)
            for sample in shard:
                index = offset
                offset += 1
                while cursor < len(batches) and batches[cursor][1] <= index:
                    yield self.decoder.collate(current)
                    current, cursor = [], cursor + 1
                if cursor == len(batches):
                    break
                start, stop = batches[cursor]
                if index < start:
                    continue
                try:
                    current.append(self.decoder(sample, None))
                except Exception as exn:
                    counter(exn, sample.get("__key__"))
                else:
                    counter.count_read()
                if index == stop - 1:
                    yield self.decoder.collate(current)
                    current, cursor = [], cursor + 1
                    if cursor == len(batches):
                        break
            else:
                if count is None and shard.fault is not None:
                    if _planned_between(batches[cursor:], offset, offset + 1):
                        lost, reason = shard.losses(None)
                        counter.skip(reason, shard_name(url), count=lost)
                    offset += 1
                elif count is not None and offset > shard_start + count:
                    log.warning("%s holds %d samples, its manifest says %d", url, offset - shard_start, count)
                elif count is not None and offset < shard_start + count:
                    lost = _planned_between(batches[cursor:], offset, shard_start + count)
                    if lost:
                        reason = shard.fault or "shard holds fewer samples than its manifest lists"
                        counter.skip(reason, shard_name(url), count=lost)
                if count is not None:
                    offset = shard_start + count
        lost = _planned_between(batches[cursor:], offset, batches[-1][1])
        if lost:
            log.warning(
                "evaluation shards ended at sample %d, before this reader's last batch %s (val_samples=%d)",
                offset, batches[-1], self.num_samples,
            )
            counter.skip(f"the shards hold fewer samples than val_samples={self.num_samples}", count=lost)
        while cursor < len(batches):
            yield self.decoder.collate(current)
            current, cursor = [], cursor + 1


def _planned_between(batches: Sequence[tuple[int, int]], low: int, high: int) -> int:
    """How many sample indices in ``[low, high)`` the batch ranges ``batches`` hold."""
    return sum(max(0, min(stop, high) - max(start, low)) for start, stop in batches)
