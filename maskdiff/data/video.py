"""Video clips from WebDataset shards (Kinetics-style): decoding in memory with PyAV and the video DataModule.

A sample holds one video file's original bytes (member ``mp4``, ``webm``, ``avi``, ``mkv`` or ``mov``)
or a pre-extracted frame sequence (members ``000.jpg, 001.jpg, ...`` or ``.png``/``.jpeg``/``.webp``),
plus ``cls`` (integer label) and optionally ``json`` (fps, frames, duration). Batches are
``(clips (B, C, F, S, S) float32 in [-1, 1], labels (B,) int64)``.
"""

from __future__ import annotations

import io
import math
import random
import re
from collections.abc import Sequence
from typing import Literal

import av
import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from av.video.reformatter import VideoReformatter
from PIL import Image

from .base import ShardsDataModule

VIDEO_EXTENSIONS = ("mp4", "webm", "avi", "mkv", "mov")
FRAME_MEMBER = re.compile(r"^(\d+)\.(png|jpg|jpeg|webp)$")
TRAIN_CROPS = ("random_resized", "random", "center")
SHORT_CLIPS = ("pad", "skip")


class ShortClipError(ValueError):
    """A video has fewer frames than a clip spans and ``short_clips="skip"``."""


def frame_members(sample: dict) -> list[str]:
    """The frame-sequence members of ``sample`` (``"000.png"``, ...), in numeric frame order."""
    frames = [(int(match.group(1)), name) for name in sample if (match := FRAME_MEMBER.match(name))]
    return [name for _, name in sorted(frames)]


class VideoDecoder:
    """Turns a webdataset sample into ``(clip (C, F, S, S) float32 in [-1, 1], label int)``.

    Temporal sampling: a clip is ``num_frames`` F frames, ``frame_stride`` s apart, so it spans
    ``(F - 1) * s + 1`` frames of the video; its first frame is drawn uniformly from ``rng`` in training
    and centred in evaluation (``rng=None``). A shorter video is padded by repeating its last frame
    (``short_clips="pad"``) or raises :class:`ShortClipError` (``"skip"``: the stream counts a skip).

    Spatial transform, the same for every frame of a clip: in training ``train_crop`` is
    ``"random_resized"`` (a crop of ``crop_scale`` × the frame area and aspect ratio in ``crop_ratio``,
    resized to S×S), ``"random"`` (shorter side resized to S, then a random S×S crop) or ``"center"``
    (as in evaluation), followed by a horizontal flip with probability 0.5 when ``hflip``; in
    evaluation the shorter side is resized to S and the centre S×S is cropped. Resizing is bilinear
    with antialiasing (``torchvision.transforms.v2.functional``).

    Videos are decoded from the sample's bytes in memory with PyAV (no temporary files), on one thread
    (scale with DataLoader workers) and only up to the clip's last frame; the clip's frames are converted
    to ``gray`` (``channels=1``) or ``rgb24`` (3) by one reused swscale context.

    Labels: ``cls`` must lie in ``[0, num_classes)``; a sample without ``cls`` gets ``-1`` when
    ``labelled=False`` and raises ``KeyError`` (a counted skip) otherwise.
    """

    def __init__(
        self,
        num_frames: int,
        frame_stride: int,
        image_size: int,
        channels: int,
        num_classes: int,
        labelled: bool = True,
        train_crop: str = "random_resized",
        crop_scale: Sequence[float] = (0.5, 1.0),
        crop_ratio: Sequence[float] = (3 / 4, 4 / 3),
        hflip: bool = False,
        short_clips: str = "pad",
    ):
        check_clip_options(num_frames, frame_stride, image_size, channels, train_crop, crop_scale, short_clips)
        if not (len(crop_ratio) == 2 and 0 < crop_ratio[0] <= crop_ratio[1]):
            raise ValueError(f"crop_ratio must be (low, high) with 0 < low <= high, got {crop_ratio!r}")
        self.num_frames = num_frames
        self.frame_stride = frame_stride
        self.image_size = image_size
        self.channels = channels
        self.num_classes = num_classes
        self.labelled = labelled
        self.train_crop = train_crop
        self.crop_scale = (float(crop_scale[0]), float(crop_scale[1]))
        self.crop_ratio = (float(crop_ratio[0]), float(crop_ratio[1]))
        self.hflip = hflip
        self.short_clips = short_clips
        self._reformatter: VideoReformatter | None = None

    @property
    def span(self) -> int:
        """Frames of the video that one clip covers: ``(num_frames - 1) * frame_stride + 1``."""
        return (self.num_frames - 1) * self.frame_stride + 1

    def __call__(self, sample: dict, rng: random.Random | None = None) -> tuple[torch.Tensor, int]:
        key = sample.get("__key__")
        label = self._label(sample, key)
        frames = self._frames(sample, key, rng)
        clip = self._spatial(frames, rng)
        return clip.float().div_(127.5).sub_(1.0).permute(1, 0, 2, 3).contiguous(), label

    def clip_indices(self, total: int, rng: random.Random | None, key: str | None = None) -> list[int]:
        """Frame indices of one clip from a video of ``total`` frames (see the class docstring)."""
        if total < 1:
            raise ValueError(f"sample {key!r}: the video has no frames")
        if total < self.span:
            if self.short_clips == "skip":
                raise ShortClipError(
                    f"sample {key!r}: {total} frames, a clip of {self.num_frames} frames at stride "
                    f"{self.frame_stride} needs {self.span} (short_clips='skip')"
                )
            return [min(i * self.frame_stride, total - 1) for i in range(self.num_frames)]
        start = rng.randint(0, total - self.span) if rng is not None else (total - self.span) // 2
        return [start + i * self.frame_stride for i in range(self.num_frames)]

    def _label(self, sample: dict, key: str | None) -> int:
        if "cls" not in sample:
            if self.labelled:
                raise KeyError(f"sample {key!r} has no 'cls' label member (set labelled=False for unlabelled videos)")
            return -1
        label = int(sample["cls"])
        if not 0 <= label < self.num_classes:
            raise ValueError(f"sample {key!r}: label {label} outside [0, {self.num_classes})")
        return label

    def _frames(self, sample: dict, key: str | None, rng: random.Random | None) -> torch.Tensor:
        """The clip's frames ``(F, C, H, W)`` uint8."""
        extension = next((ext for ext in VIDEO_EXTENSIONS if ext in sample), None)
        if extension is not None:
            arrays = self._decode_video(sample[extension], key, rng)
        else:
            names = frame_members(sample)
            if not names:
                members = sorted(k for k in sample if not k.startswith("__"))
                raise KeyError(
                    f"sample {key!r} has neither a {'/'.join(VIDEO_EXTENSIONS)} member nor frames "
                    f"000.jpg/000.png...: {members}"
                )
            arrays = [self._decode_image(sample[names[i]]) for i in self.clip_indices(len(names), rng, key)]
        pixels = torch.from_numpy(np.stack(arrays))
        return pixels.unsqueeze(1) if self.channels == 1 else pixels.permute(0, 3, 1, 2)

    def _to_array(self, frame: av.VideoFrame) -> np.ndarray:
        if self._reformatter is None:
            self._reformatter = VideoReformatter()
        return self._reformatter.reformat(frame, format="gray" if self.channels == 1 else "rgb24").to_ndarray()

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_reformatter": None}

    def _decode_image(self, data: bytes) -> np.ndarray:
        with Image.open(io.BytesIO(data)) as opened:
            return np.asarray(opened.convert("L" if self.channels == 1 else "RGB"))

    def _decode_video(self, data: bytes, key: str | None, rng: random.Random | None) -> list[np.ndarray]:
        """Decode the clip's frames of a video file held in ``data``; ``av.error.FFmpegError`` when it is broken."""
        with av.open(io.BytesIO(data), mode="r") as container:
            if not container.streams.video:
                raise ValueError(f"sample {key!r}: the video file has no video stream")
            stream = container.streams.video[0]
            stream.codec_context.thread_count = 1
            if stream.frames > 0:
                indices = self.clip_indices(stream.frames, rng, key)
                wanted = set(indices)
                found: dict[int, np.ndarray] = {}
                for index, frame in enumerate(container.decode(stream)):
                    if index in wanted:
                        found[index] = self._to_array(frame)
                    if index >= indices[-1]:
                        break
                if len(found) == len(wanted):
                    return [found[i] for i in indices]
        # The frame count is unknown (e.g. WebM) or the header overstates it: decode every frame once.
        with av.open(io.BytesIO(data), mode="r") as container:
            stream = container.streams.video[0]
            stream.codec_context.thread_count = 1
            frames = [self._to_array(frame) for frame in container.decode(stream)]
        return [frames[i] for i in self.clip_indices(len(frames), rng, key)]

    def _spatial(self, frames: torch.Tensor, rng: random.Random | None) -> torch.Tensor:
        """``(F, C, H, W)`` uint8 -> ``(F, C, S, S)`` uint8, one crop for all frames."""
        size = self.image_size
        if rng is not None and self.train_crop == "random_resized":
            top, left, height, width = self._random_resized_box(frames.shape[-2], frames.shape[-1], rng)
            frames = TF.resized_crop(frames, top, left, height, width, [size, size], antialias=True)
        elif rng is not None and self.train_crop == "random":
            frames = self._resize_shorter(frames)
            top = rng.randint(0, frames.shape[-2] - size)
            left = rng.randint(0, frames.shape[-1] - size)
            frames = TF.crop(frames, top, left, size, size)
        else:
            frames = TF.center_crop(self._resize_shorter(frames), [size, size])
        if rng is not None and self.hflip and rng.random() < 0.5:
            frames = frames.flip(-1)
        return frames

    def _resize_shorter(self, frames: torch.Tensor) -> torch.Tensor:
        if min(frames.shape[-2:]) == self.image_size:
            return frames
        return TF.resize(frames, [self.image_size], antialias=True)

    def _random_resized_box(self, height: int, width: int, rng: random.Random) -> tuple[int, int, int, int]:
        """``(top, left, h, w)`` as in torchvision's ``RandomResizedCrop.get_params``, drawn from ``rng``."""
        area = height * width
        log_low, log_high = math.log(self.crop_ratio[0]), math.log(self.crop_ratio[1])
        for _ in range(10):
            target = area * rng.uniform(*self.crop_scale)
            aspect = math.exp(rng.uniform(log_low, log_high))
            w = round(math.sqrt(target * aspect))
            h = round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                return rng.randint(0, height - h), rng.randint(0, width - w), h, w
        ratio = width / height
        if ratio < self.crop_ratio[0]:
            w, h = width, round(width / self.crop_ratio[0])
        elif ratio > self.crop_ratio[1]:
            h, w = height, round(height * self.crop_ratio[1])
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def collate(self, samples: Sequence[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """``[(clip (C, F, S, S), label)] * B -> (clips (B, C, F, S, S), labels (B,) int64)``; B may be 0."""
        if not samples:
            shape = (0, self.channels, self.num_frames, self.image_size, self.image_size)
            return torch.empty(shape, dtype=torch.float32), torch.empty(0, dtype=torch.int64)
        clips, labels = zip(*samples)
        return torch.stack(clips), torch.tensor(labels, dtype=torch.int64)


def check_clip_options(num_frames, frame_stride, image_size, channels, train_crop, crop_scale, short_clips) -> None:
    """Raise ``ValueError`` naming the first bad clip option."""
    for name, value in (("num_frames", num_frames), ("frame_stride", frame_stride), ("image_size", image_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")
    if train_crop not in TRAIN_CROPS:
        raise ValueError(f"train_crop must be one of {TRAIN_CROPS}, got {train_crop!r}")
    if short_clips not in SHORT_CLIPS:
        raise ValueError(f"short_clips must be one of {SHORT_CLIPS}, got {short_clips!r}")
    if not (len(crop_scale) == 2 and 0 < crop_scale[0] <= crop_scale[1] <= 1):
        raise ValueError(f"crop_scale must be (low, high) with 0 < low <= high <= 1, got {crop_scale!r}")


class VideoShardsDataModule(ShardsDataModule):
    """Video clips with class labels from WebDataset tar shards (Kinetics-style; see :class:`VideoDecoder`).

    Batches are ``(clips, labels)``: clips float32 ``(B, C, num_frames, image_size, image_size)`` in
    [-1, 1], labels int64 ``(B,)`` (``-1`` for unlabelled samples). Streaming, epochs, evaluation,
    skip counting and resume: see :class:`~maskdiff.data.base.ShardsDataModule`. Undecodable videos,
    samples without a label (``labelled=True``) and, with ``short_clips="skip"``, too-short videos are
    counted skips.

    Args:
        train_shards: brace pattern of training shards, e.g. ``/data/kinetics400/k400-train-{000000..000239}.tar``.
        val_shards: brace pattern of validation shards (also used for test and predict), or ``None``.
        num_frames: frames F per clip.
        frame_stride: take every ``frame_stride``-th frame (a clip spans ``(F - 1) * stride + 1`` frames).
        image_size: side S of the square output frames.
        channels: 1 (grayscale) or 3 (RGB).
        num_classes: labels must lie in ``[0, num_classes)``; may be 0 when ``labelled=False``.
        labelled: require a ``cls`` member (``False``: samples without one get label ``-1``).
        train_crop: ``"random_resized"``, ``"random"`` or ``"center"`` (see :class:`VideoDecoder`).
        crop_scale: area range ``(low, high)`` of ``train_crop="random_resized"``, fractions of the frame.
        hflip: random horizontal flips in training (the same for all frames of a clip).
        short_clips: ``"pad"`` (repeat the last frame) or ``"skip"`` videos shorter than a clip.
        batch_size: training batch size per rank.
        val_batch_size: evaluation batch size per rank (default: ``batch_size``).
        num_workers: DataLoader worker processes per rank (0: load in the main process).
        shuffle_buffer: videos held in the training shuffle buffer (raw bytes: keep it small for large videos).
        train_samples_per_epoch: samples per training epoch over all ranks; ``None`` reads the manifest.
        val_samples: evaluation samples; ``None`` reads them from the manifest.
        seed: base seed of the training stream.
        max_errors: stop the run once more than this many samples were skipped (``None``: no limit).
        stall_timeout: seconds a data reader may go without a sample (with worker processes, the loader without
            a batch) before the run stops with an error naming the shards (``None``: no bound).
    """

    def __init__(
        self,
        train_shards: str,
        val_shards: str | None = None,
        num_frames: int = 16,
        frame_stride: int = 4,
        image_size: int = 224,
        channels: int = 3,
        num_classes: int = 400,
        labelled: bool = True,
        train_crop: Literal["random_resized", "random", "center"] = "random_resized",
        crop_scale: tuple[float, float] = (0.5, 1.0),
        hflip: bool = False,
        short_clips: Literal["pad", "skip"] = "pad",
        batch_size: int = 8,
        val_batch_size: int | None = None,
        num_workers: int = 4,
        shuffle_buffer: int = 100,
        train_samples_per_epoch: int | None = None,
        val_samples: int | None = None,
        seed: int = 0,
        max_errors: int | None = None,
        stall_timeout: float | None = 600.0,
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
        self._num_frames = num_frames
        self.frame_stride = frame_stride
        self._image_size = image_size
        self._channels = channels
        self._num_classes = num_classes
        self.labelled = labelled
        self.train_crop = train_crop
        self.crop_scale = tuple(crop_scale)
        self.hflip = hflip
        self.short_clips = short_clips
        self._check_config()

    @property
    def num_frames(self) -> int:
        return self._num_frames

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
        check_clip_options(self.num_frames, self.frame_stride, self.image_size, self.channels, self.train_crop,
                           self.crop_scale, self.short_clips)
        smallest = 1 if self.labelled else 0
        if not isinstance(self.num_classes, int) or self.num_classes < smallest:
            raise ValueError(f"num_classes must be an integer >= {smallest} (labelled={self.labelled}), "
                             f"got {self.num_classes!r}")

    def make_decoder(self, train: bool) -> VideoDecoder:
        return VideoDecoder(
            self.num_frames,
            self.frame_stride,
            self.image_size,
            self.channels,
            self.num_classes,
            labelled=self.labelled,
            train_crop=self.train_crop,
            crop_scale=self.crop_scale,
            hflip=self.hflip and train,
            short_clips=self.short_clips,
        )
