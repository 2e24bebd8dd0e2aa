"""Decoding and the two ways of reading shards: resampled training streams and exactly-once evaluation streams.

The streams are generic over a *sample decoder*: any object with

- ``decoder(sample: dict, rng: random.Random | None) -> (tensor, label)``: decode one webdataset sample;
  ``rng`` is given for training (random augmentation drawn from it) and ``None`` for evaluation
  (deterministic transform);
- ``decoder.collate(list_of_pairs) -> (batch, labels (B,) int64)``, which must accept an empty list.

:class:`ImageDecoder` is the image one: batches ``(images (B, C, S, S) float32 in [-1, 1], labels (B,))``.
"""

from __future__ import annotations

import io
import itertools
import logging
import math
import random
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

log = logging.getLogger("maskdiff.data")

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")

class ImageDecoder:
    """Turns a webdataset sample dict into ``(image (C, S, S) float32 in [-1, 1], label int)``.

    The first member among ``png/jpg/jpeg/webp`` is decoded with PIL and converted to ``"L"``
    (``channels == 1``) or ``"RGB"`` (``channels == 3``). Non-square images are center-cropped to a
    square; images whose size differs from ``image_size`` are resized bilinearly (PIL antialiases when
    downscaling). The label is the integer in the ``cls`` member and must lie in ``[0, num_classes)``.
    """

    def __init__(self, image_size: int, channels: int, num_classes: int, hflip: bool = False):
        self.image_size = image_size
        self.channels = channels
        self.num_classes = num_classes
        self.hflip = hflip

    def __call__(self, sample: dict, rng: random.Random | None = None) -> tuple[torch.Tensor, int]:
        extension = next((ext for ext in IMAGE_EXTENSIONS if ext in sample), None)
        if extension is None:
            members = sorted(k for k in sample if not k.startswith("__"))
            raise KeyError(f"sample {sample.get('__key__')!r} has no {'/'.join(IMAGE_EXTENSIONS)} member: {members}")
        if "cls" not in sample:
            raise KeyError(f"sample {sample.get('__key__')!r} has no 'cls' label member")
        label = int(sample["cls"])
        if not 0 <= label < self.num_classes:
            raise ValueError(f"sample {sample.get('__key__')!r}: label {label} outside [0, {self.num_classes})")
        with Image.open(io.BytesIO(sample[extension])) as opened:
            image = opened.convert("L" if self.channels == 1 else "RGB")
        image = self._square(image)
        pixels = torch.from_numpy(np.array(image, dtype=np.uint8))
        pixels = pixels.unsqueeze(0) if self.channels == 1 else pixels.permute(2, 0, 1)
        image = pixels.float().div_(127.5).sub_(1.0).contiguous()
        if rng is not None and self.hflip and rng.random() < 0.5:
            image = image.flip(-1)
        return image, label

    def _square(self, image: Image.Image) -> Image.Image:
        width, height = image.size
        if width != height:
            side = min(width, height)
            left, top = (width - side) // 2, (height - side) // 2
            image = image.crop((left, top, left + side, top + side))
        if image.size != (self.image_size, self.image_size):
            image = image.resize((self.image_size, self.image_size), Image.Resampling.BILINEAR)
        return image

    def collate(self, samples: Sequence[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """``[(image (C, S, S), label)] * B -> (images (B, C, S, S), labels (B,) int64)``; B may be 0."""
        if not samples:
            shape = (0, self.channels, self.image_size, self.image_size)
            return torch.empty(shape, dtype=torch.float32), torch.empty(0, dtype=torch.int64)
        images, labels = zip(*samples)
        return torch.stack(images), torch.tensor(labels, dtype=torch.int64)


def _pass_through(batch):
    return batch


class _ErrorStreak:
    """Wraps a handler; raises once more than ``limit`` errors happen with no success in between."""

    def __init__(self, handler: Callable[[BaseException], bool], limit: int):
        self.handler = handler
        self.limit = limit
        self.streak = 0

    def __call__(self, exn: BaseException) -> bool:
        self.streak += 1
        if self.streak > self.limit:
            raise RuntimeError(
                f"{self.streak} consecutive samples or shards failed, the stream would never yield; "
                f"last error: {type(exn).__name__}: {exn}"
            ) from exn
        return self.handler(exn)


class ResampledTrainStream(IterableDataset):
    """Endless stream of decoded ``(image (C, S, S), label)`` samples for training.

    Each rank and worker draws shards with replacement from all ``urls`` (no node/worker splitting),
    reads them, shuffles raw samples in a ``shuffle_buffer``-sized buffer, then decodes them with a
    seeded ``random.Random`` for the decoder's augmentation. The random generator is seeded from ``(seed, rank, worker id, epoch, local
    iteration count)``: ``epoch`` is set in the main process before each epoch; the local count keeps
    epochs distinct inside persistent workers (which hold the copy made when they started).
    """

    def __init__(
        self,
        urls: Sequence[str],
        decoder: Callable,
        handler: Callable[[BaseException], bool],
        seed: int,
        rank: int = 0,
        shuffle_buffer: int = 1000,
        max_error_streak: int = 1000,
    ):
        super().__init__()
        self.urls = list(urls)
        self.decoder = decoder
        self.handler = handler
        self.seed = seed
        self.rank = rank
        self.shuffle_buffer = shuffle_buffer
        self.max_error_streak = max_error_streak
        self.epoch = 0
        self._iterations = 0

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int]]:
        worker = get_worker_info()
        self._iterations += 1
        worker_id = worker.id if worker else 0
        rng = random.Random(wds.utils.make_seed(self.seed, self.rank, worker_id, self.epoch, self._iterations))
        shard_rng, shuffle_rng, augment_rng = (random.Random(rng.getrandbits(64)) for _ in range(3))
        handler = _ErrorStreak(self.handler, self.max_error_streak)
        shards = (dict(url=shard_rng.choice(self.urls)) for _ in itertools.count())
        samples = wds.tarfile_to_samples(handler=handler)(shards)
        if self.shuffle_buffer > 1:
            samples = wds.shuffle(self.shuffle_buffer, initial=min(100, self.shuffle_buffer), rng=shuffle_rng)(samples)
        for sample in samples:
            try:
                decoded = self.decoder(sample, augment_rng)
            except Exception as exn:
                if handler(exn):
                    continue
                return
            handler.streak = 0
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

    A sample that fails to decode is skipped (``handler``), making its batch smaller; if shards end
    before ``num_samples`` the remaining batches are short or empty (``b == 0``) so that all ranks
    still yield the same number of batches. Only the first ``num_samples`` samples are used.
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
        handler: Callable[[BaseException], bool],
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
        cursor = 0
        offset = 0
        for shard, url in enumerate(self.urls):
            if cursor == len(batches):
                break
            count = self.shard_counts[shard] if self.shard_counts is not None else None
            if count is not None and offset + count <= batches[cursor][0]:
                offset += count
                continue
            shard_start = offset
            for sample in wds.tarfile_to_samples(handler=self.handler)([dict(url=url)]):
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
                    if not self.handler(exn):
                        return
                if index == stop - 1:
                    yield self.decoder.collate(current)
                    current, cursor = [], cursor + 1
                    if cursor == len(batches):
                        break
            else:
                if count is not None and offset != shard_start + count:
                    log.warning("%s holds %d samples, its manifest says %d", url, offset - shard_start, count)
                    offset = shard_start + count
        if cursor < len(batches):
            log.warning(
                "evaluation shards ended at sample %d, before this reader's last batch %s (val_samples=%d)",
                offset, batches[-1], self.num_samples,
            )
        while cursor < len(batches):
            yield self.decoder.collate(current)
            current, cursor = [], cursor + 1


class _EpochAwareLoader(wds.WebLoader):
    """A WebLoader that tells its training stream the new epoch number when an epoch's first batch is asked for.

    Counting happens lazily (not in ``__iter__``) because Lightning probes non-DataLoader loaders
    with a bare ``iter()`` before fitting.
    """

    def __init__(self, dataset, stream: ResampledTrainStream, next_epoch: Callable[[], int], **kwargs):
        super().__init__(dataset, **kwargs)
        self._stream = stream
        self._next_epoch = next_epoch

    def iterator1(self):
        self._stream.epoch = self._next_epoch()
        return super().iterator1()
