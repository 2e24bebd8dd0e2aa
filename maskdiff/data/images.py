"""Image WebDataset DataModules: resampled streaming training and exactly-once, DDP-balanced evaluation.

Batches are ``(images, labels)``: images float32 ``(B, C, S, S)`` in [-1, 1], labels int64 ``(B,)``.
"""

from __future__ import annotations

import logging
import os
from typing import Literal

import torch

from .base import ShardsDataModule
from .digits import ensure_digits_shards
from .streams import ImageDecoder
from .transforms import to_signed_float

log = logging.getLogger("maskdiff.data")


class ImageShardsDataModule(ShardsDataModule):
    """Images with class labels from WebDataset tar shards (members ``png/jpg/jpeg/webp`` + ``cls``).

    Write such shards from an image folder or a file list with ``maskdiff shards images SRC OUT``
    (:func:`~maskdiff.data.image_writer.write_image_shards`), which also writes the ``manifest.json``
    holding the sample counts.

    Batches are ``(images, labels)``: images float32 ``(B, C, image_size, image_size)`` in [-1, 1],
    labels int64 ``(B,)``. Streaming, epochs, evaluation and resume: see :class:`ShardsDataModule`.

    Args:
        train_shards: brace pattern of training shards, e.g. ``/data/in1k-train-{000000..000639}.tar``
            (``::`` joins several; ``pipe:``/``http(s)://``/``s3://``/``gs://`` URLs are not checked).
        val_shards: brace pattern of validation shards (also used for test and predict), or ``None``.
        image_size: side S of the square output images.
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
        max_errors: stop the run once more than this many samples were skipped (``None``: no limit).
        stall_timeout: seconds a data reader may go without a sample (with worker processes, the loader without
            a batch) before the run stops with an error naming the shards (``None``: no bound).
        crop: ``"center"`` (largest centred square, bilinear resize), ``"adm_center"`` (guided-diffusion's
            ``center_crop_arr``, for DiT/MDT), ``"random_resized"`` (MAE's RandomResizedCrop in training,
            resize + centre crop in evaluation) or ``"inception"`` (UMD's big_vision inception crop); see
            :class:`~maskdiff.data.streams.ImageDecoder`.
        labelled: ``False`` reads shards without ``cls`` members (label -1); ``True`` skips such samples
            as errors.
        scale: area range of ``random_resized`` and ``inception`` crops (MAE: 0.2 to 1; UMD: 0.8 to 1).
        ratio: aspect-ratio (w/h) range of ``random_resized`` and ``inception`` crops (UMD: 0.75 to 1.33).
        eval_resize_ratio: ``random_resized`` and ``inception`` evaluation resizes the shorter side to
            ``int(image_size * eval_resize_ratio)`` before the centre crop (MAE: 256/224; UMD: 1).
        jpeg_draft: decode JPEGs much larger than needed at 1/2, 1/4 or 1/8 size (faster; a few grey
            levels from decoding them whole); ``False`` always decodes at full size.
        uint8_train_batches: the training loader yields uint8 images in [0, 255] (a quarter of the bytes
            between worker processes and to the GPU) that :meth:`on_after_batch_transfer` scales to
            [-1, 1] on the device, so training steps see the same batches. Evaluation loaders, which
            other code reads directly, always yield float batches.
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
        stall_timeout: float | None = 600.0,
        crop: Literal["center", "adm_center", "random_resized", "inception"] = "center",
        labelled: bool = True,
        scale: tuple[float, float] = (0.2, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        eval_resize_ratio: float = 256 / 224,
        jpeg_draft: bool = True,
        uint8_train_batches: bool = False,
    ):
        super().__init__(
            train_shards=train_shards,
            val_shards=val_shards,
            batch_size=batch_size,
            val_batch_size=val_batch_size,
            num_workers=num_workers,
            shuffle_buffer=shuffle_buffer,
            train_samples_per_epoch=train_samples_per_epoch,
            val_samples=val_samples,
            seed=seed,
            max_errors=max_errors,
            stall_timeout=stall_timeout,
        )
        self._image_size = image_size
        self._channels = channels
        self._num_classes = num_classes
        self.hflip = hflip
        self.crop = crop
        self.labelled = labelled
        self.scale = tuple(scale)
        self.ratio = tuple(ratio)
        self.eval_resize_ratio = eval_resize_ratio
        self.jpeg_draft = jpeg_draft
        self.uint8_train_batches = uint8_train_batches
        self._check_config()

    @property
    def image_size(self) -> int:
        return self._image_size

    @property
    def channels(self) -> int:
        return self._channels

    @property
    def num_classes(self) -> int:
        return self._num_classes

    def _check_config(self) -> None:
        super()._check_config()
        for name in ("image_size", "num_classes"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels!r}")
        self.make_decoder(train=True)  # validates crop, scale, ratio and eval_resize_ratio

    def make_decoder(self, train: bool) -> ImageDecoder:
        return ImageDecoder(
            self.image_size,
            self.channels,
            self.num_classes,
            hflip=self.hflip and train,
            crop=self.crop,
            labelled=self.labelled,
            scale=self.scale,
            ratio=self.ratio,
            eval_resize_ratio=self.eval_resize_ratio,
            jpeg_draft=self.jpeg_draft,
            uint8_batches=train and self.uint8_train_batches,
        )

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """Scale uint8 image batches (``uint8_train_batches``) to float32 in [-1, 1], on the batch's device."""
        if isinstance(batch, (tuple, list)) and len(batch) == 2 and getattr(batch[0], "dtype", None) == torch.uint8:
            return to_signed_float(batch[0]), batch[1]
        return batch


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
        max_errors: stop the run once more than this many samples were skipped (``None``: no limit).
        stall_timeout: seconds a data reader may go without a sample (with worker processes, the loader without
            a batch) before the run stops with an error naming the shards (``None``: no bound).
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
        stall_timeout: float | None = 600.0,
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
            stall_timeout=stall_timeout,
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
