"""Image WebDataset DataModules: resampled streaming training and exactly-once, DDP-balanced evaluation.

Batches are ``(images, labels)``: images float32 ``(B, C, S, S)`` in [-1, 1], labels int64 ``(B,)``.
"""

from __future__ import annotations

import collections
import logging
import os

import lightning as L
import webdataset as wds

from .digits import ensure_digits_shards
from .shards import SkipCounter, check_local_shards, expand_urls, lookup_shard_counts
from .streams import EvalStream, ImageDecoder, ResampledTrainStream, _EpochAwareLoader, _pass_through, eval_batch_plan

log = logging.getLogger("maskdiff.data")


class ImageShardsDataModule(L.LightningDataModule):
    """Images with class labels from WebDataset tar shards (members ``png/jpg/jpeg/webp`` + ``cls``).

    Batches are ``(images, labels)``: images float32 ``(B, C, image_size, image_size)`` in [-1, 1],
    labels int64 ``(B,)``.

    Training streams without end (:class:`ResampledTrainStream`): each rank and worker draws shards
    with replacement; an epoch is ``train_samples_per_epoch // (world_size * batch_size)`` batches
    per rank (at least 1), which is also ``len(train_dataloader())``.

    Validation, test and predict read ``val_shards`` once (:class:`EvalStream`): every sample exactly
    once over all ranks and workers, and the same number of batches on every rank.

    ``skipped`` counts samples skipped because they failed to read or decode (see
    :class:`~maskdiff.data.shards.SkipCounter`). With ``num_workers > 0`` the total is shared
    across worker processes; the per-reason ``skip_reasons`` only sees skips made in the main
    process (``num_workers=0``); workers log their first skips as warnings on ``maskdiff.data``.

    Checkpoints store ``seed`` and ``epochs_seen``. Streaming is resampled, so resuming does not
    replay the interrupted epoch's remaining samples: it starts a fresh epoch whose seed is derived
    from ``(seed, epochs_seen + 1)``.

    Args:
        train_shards: brace pattern of training shards, e.g. ``/data/in1k-train-{000000..000639}.tar``
            (``::`` joins several; ``pipe:``/``http(s)://``/``s3://``/``gs://`` URLs are not checked).
        val_shards: brace pattern of validation shards (also used for test and predict), or ``None``.
        image_size: side S of the square output images; stored images of another size are resized.
        channels: 1 (grayscale) or 3 (RGB).
        num_classes: labels must lie in ``[0, num_classes)``; others are skipped as errors.
        batch_size: training batch size per rank.
        val_batch_size: evaluation batch size per rank (default: ``batch_size``).
        num_workers: DataLoader worker processes per rank (0: load in the main process).
        shuffle_buffer: samples held in the training shuffle buffer (0 or 1: no shuffling).
        train_samples_per_epoch: samples per training epoch over all ranks; ``None`` reads the total
            from the ``manifest.json`` next to the shards, and is an error without one.
        val_samples: evaluation samples; ``None`` reads them from the manifest like above.
        hflip: random horizontal flips in training (never for digits or text).
        seed: base seed of the training stream.
        max_errors: re-raise once more than this many samples were skipped (``None``: no limit).
    """

    def __init__(
        self,
        train_shards: str,
        val_shards: str | None = None,
        image_size: int = 32,
        channels: int = 3,
        num_classes: int = 1000,
        batch_size: int = 64,
        val_batch_size: int | None = None,
        num_workers: int = 2,
        shuffle_buffer: int = 1000,
        train_samples_per_epoch: int | None = None,
        val_samples: int | None = None,
        hflip: bool = False,
        seed: int = 0,
        max_errors: int | None = None,
    ):
        super().__init__()
        self.train_shards = train_shards
        self.val_shards = val_shards
        self._image_size = image_size
        self._channels = channels
        self._num_classes = num_classes
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size
        self.num_workers = num_workers
        self.shuffle_buffer = shuffle_buffer
        self.train_samples_per_epoch = train_samples_per_epoch
        self.val_samples = val_samples
        self.hflip = hflip
        self.seed = seed
        self.max_errors = max_errors
        self.epochs_seen = 0
        self._check_config()
        self._counters: dict[str, SkipCounter] = {}
        self._train_urls: list[str] | None = None
        self._train_total: int | None = None
        self._val_urls: list[str] | None = None
        self._val_counts: list[int] | None = None
        self._val_total: int | None = None

    @property
    def image_size(self) -> int:
        return self._image_size

    @property
    def channels(self) -> int:
        return self._channels

    @property
    def num_classes(self) -> int:
        return self._num_classes

    @property
    def skipped(self) -> int:
        """Samples skipped so far (train and evaluation; cumulative since construction)."""
        return sum(counter.skipped for counter in self._counters.values())

    @property
    def skip_reasons(self) -> collections.Counter:
        """Reasons of skips made in this process, ``"ExceptionType: message" -> count``."""
        return sum((counter.reasons for counter in self._counters.values()), collections.Counter())

    def _check_config(self) -> None:
        for name in ("image_size", "batch_size", "num_classes"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels!r}")
        if self.val_batch_size is not None and self.val_batch_size < 1:
            raise ValueError(f"val_batch_size must be a positive integer, got {self.val_batch_size!r}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers!r}")

    def _distributed_info(self) -> tuple[int, int]:
        """``(global_rank, world_size)`` of the attached trainer, ``(0, 1)`` without one."""
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 0, 1
        return int(trainer.global_rank), int(trainer.world_size)

    def _counter(self, split: str) -> SkipCounter:
        if split not in self._counters:
            self._counters[split] = SkipCounter(self.max_errors, shared=self.num_workers > 0, name=split)
        return self._counters[split]

    def _decoder(self) -> ImageDecoder:
        return ImageDecoder(self.image_size, self.channels, self.num_classes)

    @staticmethod
    def _resolve_shards(pattern: str | None, name: str) -> list[str]:
        if not pattern:
            raise ValueError(f"{name} is empty: give a shard pattern such as /data/x-{{000000..000009}}.tar")
        urls = expand_urls(pattern)
        check_local_shards(urls, pattern)
        return urls

    def setup(self, stage: str | None = None) -> None:
        """Preflight: expand and check shard patterns, resolve sample counts, validate the config."""
        self._check_config()
        rank, world_size = self._distributed_info()
        if stage in (None, "fit"):
            self._train_urls = self._resolve_shards(self.train_shards, "train_shards")
            self._train_total = self.train_samples_per_epoch
            if self._train_total is None:
                counts = lookup_shard_counts(self._train_urls)
                if counts is None:
                    raise ValueError(
                        "train_samples_per_epoch is required: no manifest.json next to "
                        f"{self.train_shards!r} lists its shards"
                    )
                self._train_total = sum(counts)
        if stage in ("validate", "test", "predict") and not self.val_shards:
            raise ValueError(f"stage {stage!r} needs val_shards, which is not set")
        if self.val_shards:
            self._val_urls = self._resolve_shards(self.val_shards, "val_shards")
            self._val_counts = lookup_shard_counts(self._val_urls)
            self._val_total = self.val_samples
            if self._val_total is None:
                if self._val_counts is None:
                    raise ValueError(
                        f"val_samples is required: no manifest.json next to {self.val_shards!r} lists its shards"
                    )
                self._val_total = sum(self._val_counts)
            eval_batch_plan(self._val_total, world_size, rank, self.val_batch_size or self.batch_size)
            readers = world_size * max(self.num_workers, 1)
            if rank == 0 and self._val_counts is None and readers > 1:
                log.warning(
                    "val shard sizes unknown (no manifest.json): each of the %d readers scans %s from the start",
                    readers, self.val_shards,
                )
            elif rank == 0 and len(self._val_urls) < readers:
                log.warning(
                    "%d val shards for %d readers (%d ranks x %d workers): readers share shards, each scanning a "
                    "shard from its start up to its own samples; write more shards for large validation sets",
                    len(self._val_urls), readers, world_size, max(self.num_workers, 1),
                )

    def train_steps(self) -> int:
        """Batches per rank and epoch: ``train_samples_per_epoch // (world_size * batch_size)``, at least 1."""
        if self._train_total is None:
            self.setup("fit")
        _, world_size = self._distributed_info()
        return max(1, self._train_total // (world_size * self.batch_size))

    def _next_train_epoch(self) -> int:
        self.epochs_seen += 1
        return self.epochs_seen

    def train_dataloader(self):
        """Endless resampled stream cut into epochs of :meth:`train_steps` batches."""
        if self._train_urls is None:
            self.setup("fit")
        rank, _ = self._distributed_info()
        steps = self.train_steps()
        stream = ResampledTrainStream(
            self._train_urls,
            self._decoder(),
            self._counter("train"),
            seed=self.seed,
            rank=rank,
            shuffle_buffer=self.shuffle_buffer,
            hflip=self.hflip,
        )
        decoder = stream.decoder
        pipeline = wds.DataPipeline(stream, wds.batched(self.batch_size, collation_fn=decoder.collate, partial=False))
        loader = _EpochAwareLoader(
            pipeline,
            stream=stream,
            next_epoch=self._next_train_epoch,
            batch_size=None,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=_pass_through,
        )
        return loader.with_epoch(steps).with_length(steps, silent=True)

    def val_dataloader(self):
        """This rank's share of ``val_shards``, each sample once; ``[]`` when ``val_shards`` is unset."""
        if not self.val_shards:
            return []
        if self._val_urls is None:
            self.setup("validate")
        rank, world_size = self._distributed_info()
        stream = EvalStream(
            self._val_urls,
            self._val_counts,
            self._val_total,
            rank=rank,
            world_size=world_size,
            batch_size=self.val_batch_size or self.batch_size,
            decoder=self._decoder(),
            handler=self._counter("val"),
        )
        num_workers = min(self.num_workers, len(stream))
        loader = wds.WebLoader(
            stream,
            batch_size=None,
            num_workers=num_workers,
            persistent_workers=num_workers > 0,
            collate_fn=_pass_through,
        )
        return loader.with_length(len(stream), silent=True)

    def test_dataloader(self):
        return self.val_dataloader()

    def predict_dataloader(self):
        return self.val_dataloader()

    def state_dict(self) -> dict:
        return {"seed": self.seed, "epochs_seen": self.epochs_seen}

    def load_state_dict(self, state_dict: dict) -> None:
        if state_dict.get("seed", self.seed) != self.seed:
            log.warning("restoring data seed %s from the checkpoint (configured: %s)", state_dict["seed"], self.seed)
        self.seed = int(state_dict.get("seed", self.seed))
        self.epochs_seen = int(state_dict.get("epochs_seen", 0))


class DigitsDataModule(ImageShardsDataModule):
    """The embedded default: scikit-learn's 1,797 real 8×8 handwritten digits (no download).

    Shards are written once to ``<cache_dir>/digits/`` (:func:`~maskdiff.data.digits.ensure_digits_shards`;
    ``cache_dir`` defaults to ``$MASKDIFF_CACHE`` or ``~/.cache/maskdiff``): a seeded 1,497 / 300
    train / val split. Grayscale (``channels=1``), ``num_classes=10``; the 8×8 images are resized
    bilinearly to ``image_size``. Batches: images ``(B, 1, image_size, image_size)`` in [-1, 1],
    labels int64 ``(B,)``. ``train_samples_per_epoch=None`` means one pass over the 1,497 training
    digits. Leave ``hflip`` off: a mirrored digit is a different glyph.

    Args:
        cache_dir: folder holding the ``digits/`` shard cache (default ``$MASKDIFF_CACHE`` or
            ``~/.cache/maskdiff``).
        image_size: side S of the output images (stored at 8×8, resized bilinearly).
        batch_size: training batch size per rank.
        val_batch_size: evaluation batch size per rank (default: ``batch_size``).
        num_workers: DataLoader worker processes per rank (0: load in the main process).
        shuffle_buffer: samples held in the training shuffle buffer (0 or 1: no shuffling).
        train_samples_per_epoch: samples per training epoch over all ranks (default: 1,497).
        hflip: random horizontal flips in training; keep off for digits.
        seed: base seed of the training stream.
        max_errors: re-raise once more than this many samples were skipped (``None``: no limit).
    """

    def __init__(
        self,
        cache_dir: str | None = None,
        image_size: int = 16,
        batch_size: int = 64,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        shuffle_buffer: int = 1000,
        train_samples_per_epoch: int | None = None,
        hflip: bool = False,
        seed: int = 0,
        max_errors: int | None = None,
    ):
        super().__init__(
            train_shards="",
            val_shards=None,
            image_size=image_size,
            channels=1,
            num_classes=10,
            batch_size=batch_size,
            val_batch_size=val_batch_size,
            num_workers=num_workers,
            shuffle_buffer=shuffle_buffer,
            train_samples_per_epoch=train_samples_per_epoch,
            hflip=hflip,
            seed=seed,
            max_errors=max_errors,
        )
        self.cache_dir = cache_dir

    def _use_digits_shards(self) -> None:
        manifest = ensure_digits_shards(self.cache_dir)
        self.train_shards = os.path.join(manifest["root"], manifest["splits"]["train"]["pattern"])
        self.val_shards = os.path.join(manifest["root"], manifest["splits"]["val"]["pattern"])

    def prepare_data(self) -> None:
        self._use_digits_shards()

    def setup(self, stage: str | None = None) -> None:
        if not self.train_shards:
            self._use_digits_shards()
        super().setup(stage)

    def val_dataloader(self):
        if not self.val_shards:
            self._use_digits_shards()
        return super().val_dataloader()
