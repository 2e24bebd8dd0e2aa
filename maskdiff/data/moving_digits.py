"""Moving digits: seeded grayscale videos of scikit-learn's handwritten digits bouncing around a canvas.

A small, real video set that needs no download (the video counterpart of :mod:`maskdiff.data.digits`):
each video shows one or more 8×8 sklearn digits, upscaled to ``glyph_size`` px, moving at a constant
velocity and bouncing off the canvas borders. The label is the class of the first digit. Train videos
use only the digits of the seeded digits train split, validation videos only the held-out ones.
"""

from __future__ import annotations

import functools
import io
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import av
import numpy as np
from PIL import Image

from .digits import default_cache_dir, digits_pixels, split_indices
from .shards import (
    MANIFEST_NAME,
    brace_pattern,
    read_manifest,
    write_manifest,
    write_shards,
)
from .video import VideoShardsDataModule

MOVING_DIGITS_FORMAT_VERSION = 1
SPLITS = ("train", "val")
VIDEO_FORMATS = ("mp4", "frames")
MIN_SPEED, MAX_SPEED = 1.5, 3.0


@functools.lru_cache(maxsize=4)
def _glyphs(glyph_size: int) -> tuple[np.ndarray, np.ndarray]:
    """``(glyphs (1797, g, g) uint8, labels (1797,) int)``: sklearn's digits upscaled bilinearly to ``g`` px."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = digits_pixels(digits.images)
    glyphs = np.stack(
        [np.asarray(Image.fromarray(p, mode="L").resize((glyph_size, glyph_size), Image.Resampling.BILINEAR))
         for p in pixels]
    )
    return glyphs, digits.target.astype(int)


def bounce(start: np.ndarray, velocity: np.ndarray, steps: np.ndarray, limit: float) -> np.ndarray:
    """Positions ``(T, D)`` in ``[0, limit]`` of points moving from ``start (D,)`` at ``velocity (D,)`` per step,
    reflected at 0 and ``limit`` (a triangle wave), at the times ``steps (T,)``."""
    if limit <= 0:
        return np.zeros((len(steps), len(start)))
    unfolded = start[None, :] + velocity[None, :] * np.asarray(steps, dtype=np.float64)[:, None]
    return limit - np.abs(np.mod(unfolded, 2 * limit) - limit)


def _check_options(num_frames: int, canvas: int, digits_per_video: int, glyph_size: int, fps: int) -> None:
    for name, value in (("num_frames", num_frames), ("canvas", canvas), ("digits_per_video", digits_per_video),
                        ("glyph_size", glyph_size), ("fps", fps)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if glyph_size > canvas:
        raise ValueError(f"glyph_size {glyph_size} does not fit on a canvas of {canvas} px; expected glyph_size <= canvas")


def render_moving_digits(
    index: int,
    split: str = "train",
    num_frames: int = 16,
    canvas: int = 32,
    digits_per_video: int = 1,
    glyph_size: int = 16,
    seed: int = 0,
) -> tuple[np.ndarray, dict]:
    """Video ``index`` of ``split``: ``(frames (num_frames, canvas, canvas) uint8, info)``.

    ``info`` holds ``digits`` (sklearn indices), ``labels`` (their classes; the sample's label is the
    first), ``start`` (top-left corners at frame 0, ``[[x, y], ...]``) and ``velocity`` (px per frame,
    ``[[vx, vy], ...]``, speed in [1.5, 3]). Overlapping digits are combined with a pixel-wise maximum.
    Depends only on the arguments (not on how many videos are written).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    _check_options(num_frames, canvas, digits_per_video, glyph_size, fps=1)
    glyphs, labels = _glyphs(glyph_size)
    pool = split_indices(len(labels), 1 / 6, seed)[split]
    rng = np.random.default_rng([seed, SPLITS.index(split), index])
    chosen = rng.choice(pool, size=digits_per_video)
    limit = canvas - glyph_size
    starts = rng.uniform(0, limit, size=(digits_per_video, 2))
    angles = rng.uniform(0, 2 * np.pi, size=digits_per_video)
    speeds = rng.uniform(MIN_SPEED, MAX_SPEED, size=digits_per_video)
    velocities = np.stack([np.cos(angles), np.sin(angles)], axis=1) * speeds[:, None]
    frames = np.zeros((num_frames, canvas, canvas), dtype=np.uint8)
    steps = np.arange(num_frames)
    for digit, start, velocity in zip(chosen, starts, velocities):
        corners = np.rint(bounce(start, velocity, steps, limit)).astype(int)
        for frame, (x, y) in zip(frames, corners):
            window = frame[y : y + glyph_size, x : x + glyph_size]
            np.maximum(window, glyphs[digit], out=window)
    info = {
        "digits": [int(d) for d in chosen],
        "labels": [int(labels[d]) for d in chosen],
        "start": np.round(starts, 4).tolist(),
        "velocity": np.round(velocities, 4).tolist(),
    }
    return frames, info


@functools.lru_cache(maxsize=1)
def mp4_codec() -> str:
    """``"libx264"`` (lossless: ``qp=0``, full-range gray) when PyAV's FFmpeg has it, else ``"mpeg4"`` (quantiser 1)."""
    try:
        av.codec.Codec("libx264", "w")
    except av.codec.codec.UnknownCodecError:
        return "mpeg4"
    return "libx264"


def encode_gray_mp4(frames: np.ndarray, fps: int = 8, codec: str | None = None) -> bytes:
    """Grayscale frames ``(T, H, W)`` uint8 -> MP4 bytes (encoded in memory, byte-reproducible).

    With ``libx264`` the video is lossless (``qp=0``, ``gray``, flagged full colour range), so decoding
    gives the frames back exactly; the ``mpeg4`` fallback (``yuv420p`` limited range, quantiser 1, even
    sizes only) is close (mean error below 1 grey level) but lossy.
    """
    frames = np.asarray(frames)
    if frames.ndim != 3 or frames.dtype != np.uint8:
        raise ValueError(f"expected grayscale frames (T, H, W) uint8, got {frames.shape} {frames.dtype}")
    codec = codec or mp4_codec()
    lossless = codec == "libx264"
    full_range = av.video.reformatter.ColorRange.JPEG
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        options = {"qp": "0", "preset": "medium", "threads": "1"} if lossless else {"qmin": "1", "qmax": "1"}
        stream = container.add_stream(codec, rate=fps, options=options)
        stream.height, stream.width = frames.shape[1:]
        stream.pix_fmt = "gray" if lossless else "yuv420p"
        stream.codec_context.thread_count = 1
        if lossless:
            stream.codec_context.color_range = full_range
        for pixels in frames:
            frame = av.VideoFrame.from_ndarray(pixels, format="gray")
            if lossless:
                frame.color_range = full_range
            else:
                frame = frame.reformat(format="yuv420p")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return buffer.getvalue()


def _png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def frame_member(index: int, num_frames: int) -> str:
    """Member name of frame ``index`` in a frame-sequence sample: ``"000.png"``, ``"001.png"``, ..."""
    return f"{index:0{max(3, len(str(num_frames - 1)))}d}.png"


def _samples(split: str, count: int, num_frames: int, canvas: int, digits_per_video: int, glyph_size: int,
             fps: int, seed: int, video_format: str) -> Iterator[dict]:
    for index in range(count):
        frames, info = render_moving_digits(index, split, num_frames, canvas, digits_per_video, glyph_size, seed)
        meta = {"fps": fps, "frames": num_frames, "duration": num_frames / fps, **info}
        sample = {"__key__": f"{index:06d}", "cls": info["labels"][0], "json": meta}
        if video_format == "mp4":
            sample["mp4"] = encode_gray_mp4(frames, fps)
        else:
            sample.update({frame_member(t, num_frames): _png_bytes(frame) for t, frame in enumerate(frames)})
        yield sample


def write_moving_digits_shards(
    out: str | Path,
    num_train: int = 1000,
    num_val: int = 200,
    num_frames: int = 16,
    canvas: int = 32,
    digits_per_video: int = 1,
    fps: int = 8,
    seed: int = 0,
    format: Literal["mp4", "frames"] = "mp4",
    samples_per_shard: int = 500,
    glyph_size: int = 16,
    progress: bool | None = None,
) -> dict:
    """Write moving-digits videos as ``moving-digits-{train,val}-%06d.tar`` shards plus ``manifest.json``.

    Each sample has ``__key__`` ``"%06d" % index``, ``cls`` (class of the first digit), ``json``
    (``fps``, ``frames``, ``duration`` and the trajectory, see :func:`render_moving_digits`) and either
    ``mp4`` (``format="mp4"``, :func:`encode_gray_mp4`) or one grayscale PNG per frame,
    ``000.png, 001.png, ...`` (``format="frames"``). The same arguments give byte-identical files. ``progress``: a
    bar of the videos of each split on stderr (``None``: when stderr is a terminal; see :mod:`maskdiff.progress`).

    Returns:
        The manifest: ``splits[name] = {"pattern", "samples", "shards": [{"path", "samples"}]}`` (paths
        relative to ``out``) plus ``num_frames``, ``image_size`` (= ``canvas``), ``channels`` (1),
        ``classes`` (0..9), ``fps``, ``video_format``, ``codec`` and the other options.
    """
    if format not in VIDEO_FORMATS:
        raise ValueError(f"format must be one of {VIDEO_FORMATS}, got {format!r}")
    _check_options(num_frames, canvas, digits_per_video, glyph_size, fps)
    for name, value in (("num_train", num_train), ("num_val", num_val)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    manifest = {
        "name": "moving-digits",
        "format": MOVING_DIGITS_FORMAT_VERSION,
        "video_format": format,
        "codec": mp4_codec() if format == "mp4" else "png",
        "seed": seed,
        "num_frames": num_frames,
        "image_size": canvas,
        "channels": 1,
        "classes": list(range(10)),
        "fps": fps,
        "digits_per_video": digits_per_video,
        "glyph_size": glyph_size,
        "total": num_train + num_val,
        "splits": {},
    }
    for split, count in (("train", num_train), ("val", num_val)):
        samples = _samples(split, count, num_frames, canvas, digits_per_video, glyph_size, fps, seed, format)
        shards = write_shards(samples, str(out / f"moving-digits-{split}-%06d.tar"), samples_per_shard,
                              progress=progress, total=count)
        manifest["splits"][split] = {
            "pattern": brace_pattern(f"moving-digits-{split}", len(shards)),
            "samples": count,
            "shards": [{"path": os.path.basename(s["path"]), "samples": s["samples"]} for s in shards],
        }
    write_manifest(out / MANIFEST_NAME, manifest)
    return manifest


def _complete_manifest(root: Path, expected: dict) -> dict | None:
    path = root / MANIFEST_NAME
    if not path.is_file():
        return None
    manifest = read_manifest(path)
    if any(manifest.get(key) != value for key, value in expected.items()):
        return None
    shards = [s["path"] for split in manifest["splits"].values() for s in split["shards"]]
    if not all((root / name).is_file() for name in shards):
        return None
    manifest["root"] = str(root.resolve())
    return manifest


def ensure_moving_digits_shards(
    cache_dir: str | Path | None = None,
    num_train: int = 1000,
    num_val: int = 200,
    num_frames: int = 16,
    canvas: int = 32,
    digits_per_video: int = 1,
    fps: int = 8,
    seed: int = 0,
    format: Literal["mp4", "frames"] = "mp4",
    glyph_size: int = 16,
) -> dict:
    """The moving-digits manifest, writing the shards on first use.

    Each configuration has its own folder ``<cache_dir>/moving-digits/<format>-f<frames>-c<canvas>-g<glyph>-
    d<digits>-fps<fps>-n<train>+<val>-s<seed>/``; ``cache_dir`` defaults to ``$MASKDIFF_CACHE`` or
    ``~/.cache/maskdiff``. The manifest has an extra ``root`` key (the absolute shard folder). Safe to
    call from several processes at once: each writes a private temporary folder and renames it into place.
    """
    base = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    variant = (f"{format}-f{num_frames}-c{canvas}-g{glyph_size}-d{digits_per_video}-fps{fps}"
               f"-n{num_train}+{num_val}-s{seed}")
    root = base / "moving-digits" / variant
    expected = {"format": MOVING_DIGITS_FORMAT_VERSION, "video_format": format, "num_frames": num_frames,
                "image_size": canvas, "seed": seed, "digits_per_video": digits_per_video, "fps": fps,
                "glyph_size": glyph_size, "total": num_train + num_val}
    manifest = _complete_manifest(root, expected)
    if manifest is not None:
        return manifest
    if root.exists() and any(root.iterdir()):
        raise RuntimeError(f"{root} exists but holds no complete moving-digits shards of this configuration; delete it")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{variant}-", dir=root.parent))
    try:
        write_moving_digits_shards(tmp, num_train=num_train, num_val=num_val, num_frames=num_frames, canvas=canvas,
                                   digits_per_video=digits_per_video, fps=fps, seed=seed, format=format,
                                   glyph_size=glyph_size)
        tmp.chmod(0o755)
        try:
            if root.exists():
                root.rmdir()
            os.rename(tmp, root)
        except OSError:
            if _complete_manifest(root, expected) is None:
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    manifest = _complete_manifest(root, expected)
    if manifest is None:
        raise RuntimeError(f"moving-digits shards at {root} are incomplete after writing")
    return manifest


class MovingDigitsDataModule(VideoShardsDataModule):
    """Moving-digits clips (no download): batches ``(clips (B, 1, F, S, S) float32 in [-1, 1], labels (B,) int64)``.

    Shards are written once per configuration under ``<cache_dir>/moving-digits/``
    (:func:`ensure_moving_digits_shards`). Videos have ``num_frames * frame_stride`` frames by default,
    so a clip covers almost a whole video; ``train_crop="center"`` (no augmentation) and ``hflip=False``
    by default, since a mirrored digit is a different glyph. Labels: class of the first digit (10 classes).

    Args:
        cache_dir: folder holding the ``moving-digits/`` cache (default ``$MASKDIFF_CACHE`` or ``~/.cache/maskdiff``).
        num_frames: frames F per clip.
        frame_stride: take every ``frame_stride``-th frame.
        image_size: side S of the output clips (frames are resized when it differs from ``canvas``).
        canvas: side of the written videos.
        video_frames: frames per written video (default ``num_frames * frame_stride``).
        digits_per_video: digits in each video.
        glyph_size: side of the upscaled digits (sklearn's are 8 px).
        video_format: ``"mp4"`` (lossless H.264) or ``"frames"`` (one PNG per frame).
        num_train: training videos written.
        num_val: validation videos written.
        data_seed: seed of the written videos (digits, positions, velocities).
        train_crop: training crop, see :class:`~maskdiff.data.video.VideoDecoder`.
        crop_scale: area range of ``train_crop="random_resized"``.
        hflip: random horizontal flips in training (keep off for digits).
        batch_size: training batch size per rank.
        val_batch_size: evaluation batch size per rank (default: ``batch_size``).
        num_workers: DataLoader worker processes per rank (0: load in the main process).
        shuffle_buffer: samples held in the training shuffle buffer (0 or 1: no shuffling).
        train_samples_per_epoch: samples per training epoch over all ranks (default: ``num_train``).
        seed: base seed of the training stream.
        max_errors: stop the run once more than this many samples were skipped (``None``: no limit).
        stall_timeout: seconds a data reader may go without a sample (with worker processes, the loader without
            a batch) before the run stops with an error naming the shards (``None``: no bound).
    """

    def __init__(
        self,
        cache_dir: str | None = None,
        num_frames: int = 16,
        frame_stride: int = 1,
        image_size: int = 32,
        canvas: int = 32,
        video_frames: int | None = None,
        digits_per_video: int = 1,
        glyph_size: int = 16,
        video_format: Literal["mp4", "frames"] = "mp4",
        num_train: int = 1000,
        num_val: int = 200,
        data_seed: int = 0,
        train_crop: Literal["random_resized", "random", "center"] = "center",
        crop_scale: tuple[float, float] = (0.5, 1.0),
        hflip: bool = False,
        batch_size: int = 32,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        shuffle_buffer: int = 1000,
        train_samples_per_epoch: int | None = None,
        seed: int = 0,
        max_errors: int | None = None,
        stall_timeout: float | None = 600.0,
    ):
        super().__init__(
            train_shards="",
            val_shards=None,
            num_frames=num_frames,
            frame_stride=frame_stride,
            image_size=image_size,
            channels=1,
            num_classes=10,
            labelled=True,
            train_crop=train_crop,
            crop_scale=crop_scale,
            hflip=hflip,
            short_clips="pad",
            batch_size=batch_size,
            val_batch_size=val_batch_size,
            num_workers=num_workers,
            shuffle_buffer=shuffle_buffer,
            train_samples_per_epoch=train_samples_per_epoch,
            seed=seed,
            max_errors=max_errors,
            stall_timeout=stall_timeout,
        )
        self.cache_dir = cache_dir
        self.canvas = canvas
        self.video_frames = video_frames if video_frames is not None else num_frames * frame_stride
        self.digits_per_video = digits_per_video
        self.glyph_size = glyph_size
        self.video_format = video_format
        self.num_train = num_train
        self.num_val = num_val
        self.data_seed = data_seed

    def _use_moving_digits_shards(self) -> None:
        manifest = ensure_moving_digits_shards(
            self.cache_dir, num_train=self.num_train, num_val=self.num_val, num_frames=self.video_frames,
            canvas=self.canvas, digits_per_video=self.digits_per_video, seed=self.data_seed, format=self.video_format,
            glyph_size=self.glyph_size,
        )
        self.train_shards = os.path.join(manifest["root"], manifest["splits"]["train"]["pattern"])
        self.val_shards = os.path.join(manifest["root"], manifest["splits"]["val"]["pattern"])

    def prepare_data(self) -> None:
        self._use_moving_digits_shards()

    def setup(self, stage: str | None = None) -> None:
        if not self.train_shards:
            self._use_moving_digits_shards()
        super().setup(stage)

    def val_dataloader(self):
        if not self.val_shards:
            self._use_moving_digits_shards()
        return super().val_dataloader()
