"""Video inpainting: read a clip, fit it to a video model, make a space-time mask, complete it, write it out.

Convention (as for images): a pixel mask is bool, **True = generate**; a video pixel mask is ``(F, S, S)``. A
tubelet token (``tubelet × p × p`` pixels) is generated when any of its pixels is (:func:`~maskdiff.corruption.pixel_masks.token_mask` with ``tubelet``), and
the known pixels are pasted back exactly.
"""

from __future__ import annotations

import math
from pathlib import Path

import av
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from maskdiff.corruption.pixel_masks import token_mask
from maskdiff.files import atomic_path, save_image
from maskdiff.data.moving_digits import mp4_codec, render_moving_digits
from maskdiff.inpainting.masks import check_ratio, fit_square, make_mask
from maskdiff.methods.base import MaskDiffModule
from maskdiff.samplers.base import Sampler, StepCallback

MOVING_DIGITS_PREFIX = "moving_digits:"
MOVING_DIGITS_VAL_CLIPS = 200
VIDEO_MASK_KINDS = ("tube", "random", "box", "half", "outpaint", "future")
FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
ANIMATION_SUFFIXES = (".gif", ".mp4")


# ---------------------------------------------------------------------------------------------- reading clips
def load_moving_digits_clip(spec: str, num_frames: int) -> tuple[np.ndarray, int]:
    """``moving_digits:IDX`` -> the first ``num_frames`` frames ``(T, 32, 32)`` uint8 of validation video IDX of
    :class:`~maskdiff.data.MovingDigitsDataModule`'s defaults (one 16-px digit on a 32-px canvas, data seed 0),
    and its label."""
    index = spec[len(MOVING_DIGITS_PREFIX):]
    if not index.isdigit() or int(index) >= MOVING_DIGITS_VAL_CLIPS:
        raise ValueError(
            f"video {spec!r}: expected moving_digits:IDX with IDX in [0, {MOVING_DIGITS_VAL_CLIPS}) "
            "(the moving-digits validation videos)"
        )
    frames, info = render_moving_digits(int(index), "val", num_frames=num_frames)
    return frames, info["labels"][0]


def read_video_frames(path: str | Path, channels: int) -> np.ndarray:
    """A video file (MP4, GIF, WebM, ... decoded with PyAV) or a folder of frame images (sorted by name) ->
    ``(T, H, W)`` (``channels=1``) or ``(T, H, W, 3)`` uint8."""
    path = Path(path).expanduser()
    mode, av_format = ("L", "gray") if channels == 1 else ("RGB", "rgb24")
    if path.is_dir():
        names = sorted(p for p in path.iterdir() if p.suffix.lower() in FRAME_SUFFIXES)
        if not names:
            raise ValueError(f"frames folder {path} holds no {'/'.join(FRAME_SUFFIXES)} images; expected one image per frame")
        frames = []
        for name in names:
            try:
                with Image.open(name) as opened:
                    frames.append(np.asarray(opened.convert(mode)))
            except (UnidentifiedImageError, OSError) as error:
                raise ValueError(f"cannot read frame {name}: {error}") from error
        if len({frame.shape for frame in frames}) > 1:
            raise ValueError(f"frames in {path} differ in size: {sorted({frame.shape for frame in frames})}")
        return np.stack(frames)
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ValueError(f"video {path} has no video stream")
            frames = [frame.to_ndarray(format=av_format) for frame in container.decode(video=0)]
    except (FileNotFoundError, av.error.FFmpegError) as error:
        raise ValueError(
            f"cannot read video {path}: {error}; expected a video file (mp4, gif, webm, ...), a folder of frame "
            "images or moving_digits:IDX"
        ) from error
    if not frames:
        raise ValueError(f"video {path} has no frames")
    return np.stack(frames)


def fit_clip(frames: np.ndarray, num_frames: int, size: int, channels: int, start_frame: int = 0,
             tubelet: int = 1) -> torch.Tensor:
    """Frames ``(T, H, W[, 3])`` uint8 -> the model's clip ``(C, num_frames, size, size)`` in [-1, 1]: frames
    ``start_frame ..`` ``start_frame + num_frames - 1``, each centre-cropped to a square and resized bilinearly."""
    available = len(frames) - start_frame
    if start_frame < 0 or available < num_frames:
        raise ValueError(
            f"the clip has {len(frames)} frames; from start frame {start_frame} that leaves {max(available, 0)}, "
            f"but the model expects clips of {num_frames} frames (tubelet {tubelet})"
        )
    mode = "L" if channels == 1 else "RGB"
    fitted = [np.asarray(fit_square(Image.fromarray(frame).convert(mode), size, Image.Resampling.BILINEAR))
              for frame in frames[start_frame : start_frame + num_frames]]
    pixels = torch.from_numpy(np.stack(fitted)).float() / 127.5 - 1.0
    return pixels.unsqueeze(0) if channels == 1 else pixels.permute(3, 0, 1, 2)


# ---------------------------------------------------------------------------------------------- masks
def make_video_mask(
    kind: str,
    num_frames: int,
    size: int,
    tubelet: int,
    token_pixels: int,
    ratio: float = 0.9,
    box: tuple[float, float, float, float] | None = None,
    side: str = "left",
    future_frames: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """A ``(num_frames, size, size)`` bool mask, True = generate.

    Args:
        kind: ``tube`` (the same random ``ratio`` of the spatial token cells hidden in every frame, VideoMAE /
            DiffMAE's video masking), ``random`` (a ``ratio`` of all space-time tokens), ``box`` / ``half`` /
            ``outpaint`` (the image mask of :func:`~maskdiff.inpainting.make_mask` in every frame) or ``future``
            (the last ``future_frames`` frames, default half the clip: predict them from the first ones).
        num_frames, size: clip length F and side S.
        tubelet, token_pixels: a token's frames and pixel side (``random``/``tube`` stay token-aligned).
        ratio: share to generate, in (0, 1). ``tube``/``random`` hide ``N - int(N (1 - ratio))`` tokens, the
            count training's masking hides (at least one hidden and one visible).
        box, side: as :func:`~maskdiff.inpainting.make_mask`.
        future_frames: frames to generate for ``future``, in [1, F).
        generator: seeds ``tube`` and ``random``.
    """
    if kind not in VIDEO_MASK_KINDS:
        raise ValueError(f"unknown video mask kind {kind!r}; expected one of {', '.join(VIDEO_MASK_KINDS)}")
    if kind in ("box", "half", "outpaint"):
        return make_mask(kind, size, ratio, token_pixels, box, side, generator).expand(num_frames, -1, -1).clone()
    if kind == "future":
        future_frames = num_frames // 2 if future_frames is None else future_frames
        if not 0 < future_frames < num_frames:
            raise ValueError(f"future_frames {future_frames} is outside [1, {num_frames}); expected the number of "
                             f"final frames to predict from the first ones of a {num_frames}-frame clip")
        mask = torch.zeros(num_frames, size, size, dtype=torch.bool)
        mask[num_frames - future_frames :] = True
        return mask
    check_ratio(ratio)
    if size % token_pixels or num_frames % tubelet:
        raise ValueError(f"a {num_frames}x{size}x{size} clip does not split into tokens of {tubelet}x{token_pixels}x{token_pixels}")
    cells = size // token_pixels
    shape = (num_frames // tubelet, cells, cells) if kind == "random" else (1, cells, cells)
    count = math.prod(shape)
    hidden = min(max(count - int(count * (1 - ratio)), 1), count - 1) if count > 1 else 1
    chosen = torch.zeros(count, dtype=torch.bool)
    chosen[torch.randperm(count, generator=generator)[:hidden]] = True
    grid = chosen.view(shape).expand(num_frames // tubelet, cells, cells)
    return grid.repeat_interleave(tubelet, 0).repeat_interleave(token_pixels, 1).repeat_interleave(token_pixels, 2)


# ---------------------------------------------------------------------------------------------- completing
@torch.no_grad()
def inpaint_clip(module: MaskDiffModule, clip: torch.Tensor, pixel_mask: torch.Tensor, samples: int = 1,
                 sampler: Sampler | None = None, generator: torch.Generator | None = None,
                 use_ema: bool = True, callback: StepCallback | None = None) -> torch.Tensor:
    """Complete ``clip (C, F, S, S)`` in [-1, 1] where ``pixel_mask (F, S, S)`` is True with the video model's
    ``inpaint_tokens`` (DiffMAE: encoder once on the known tubelets, reverse chain on the hidden ones), ``sampler``
    defaulting to the method's own; ``callback(step, x, output)`` is called after every sampling step
    (``module.inpainting_steps`` of the clip's token mask times).

    Returns ``(samples, C, F, S, S)``; known pixels are exactly ``clip``'s.
    """
    patchifier = module.patchifier
    if patchifier.frames is None:
        raise ValueError(f"{type(module).__name__} with input {tuple(patchifier.sample_shape)} is an image model; "
                         "video inpainting needs a model whose patchifier has frames (e.g. configs/diffmae/diffmae_moving_digits.yaml)")
    if tuple(clip.shape) != tuple(patchifier.sample_shape):
        raise ValueError(f"clip of shape {tuple(clip.shape)} does not fit the model's input {tuple(patchifier.sample_shape)}")
    if tuple(pixel_mask.shape) != tuple(clip.shape[1:]):
        raise ValueError(f"video mask of shape {tuple(pixel_mask.shape)} does not fit the clip's {tuple(clip.shape[1:])}")
    token_pixels = module.autoencoder.downsample * patchifier.patch_size
    hidden = token_mask(pixel_mask, token_pixels, patchifier.tubelet).expand(samples, -1)
    clips = clip.unsqueeze(0).expand(samples, -1, -1, -1, -1).to(module.device)
    tokens = module.inpaint_tokens(module.to_tokens(clips), hidden, sampler=sampler, generator=generator,
                                   use_ema=use_ema, callback=callback)
    generated = module.autoencoder.decode(patchifier.unpatchify(tokens)).to(clip.dtype).cpu()
    return torch.where(pixel_mask, generated, clip.unsqueeze(0))


# ---------------------------------------------------------------------------------------------- writing
def to_uint8_frames(frames: torch.Tensor) -> np.ndarray:
    """``(T, C, H, W)`` in [-1, 1] -> ``(T, H, W, 3)`` uint8 (grey replicated), rounded as ``save_image`` does."""
    pixels = ((frames.float().clamp(-1, 1) * 0.5 + 0.5) * 255 + 0.5).clamp(0, 255).to(torch.uint8)
    pixels = pixels.expand(-1, 3, -1, -1) if pixels.shape[1] == 1 else pixels
    return pixels.permute(0, 2, 3, 1).numpy()


def write_animation(frames: np.ndarray, path: str | Path, fps: int = 4) -> Path:
    """Write ``frames (T, H, W, 3)`` uint8 as an animated GIF (Pillow, looping) or an MP4 (PyAV, H.264 when
    available, padded to even sides), chosen by ``path``'s suffix; atomically."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in ANIMATION_SUFFIXES:
        raise ValueError(f"video output {path} must end in {' or '.join(ANIMATION_SUFFIXES)}")
    if fps < 1:
        raise ValueError(f"fps must be at least 1, got {fps}")
    if suffix == ".gif":
        grey = bool((frames == frames[..., :1]).all())
        images = [Image.fromarray(frame[..., 0] if grey else frame) for frame in frames]
        return save_image(images[0], path, save_all=True, append_images=images[1:], duration=round(1000 / fps),
                          loop=0, optimize=False)
    height, width = frames.shape[1:3]
    padded = np.pad(frames, ((0, 0), (0, height % 2), (0, width % 2), (0, 0)), constant_values=255)
    with atomic_path(path) as temporary, av.open(str(temporary), mode="w", format="mp4") as container:
        stream = container.add_stream(mp4_codec(), rate=fps)
        stream.height, stream.width = padded.shape[1:3]
        stream.pix_fmt = "yuv420p"
        for frame in padded:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")))
        container.mux(stream.encode())
    return path
