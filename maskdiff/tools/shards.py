"""``maskdiff shards <kind> ... OUT``: write WebDataset shard sets (plus ``manifest.json``) that the DataModules stream.

    maskdiff shards digits data/digits
    maskdiff shards images /data/imagenet/train /data/in1k-shards --prefix imagenet-train --shuffle_seed 0
    maskdiff shards moving-digits data/moving-digits --format frames
    maskdiff shards videos /data/kinetics400/train /data/k400-shards --split train --prefix k400
    maskdiff shards latents '/data/in1k/imagenet-train-{000000..001281}.tar' /data/in1k-latents --vae /models/sd-vae-ft-ema

The writers live in :mod:`maskdiff.data`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from maskdiff.data.digits import write_digits_shards
from maskdiff.data.image_writer import write_image_shards
from maskdiff.data.latents import encode_latent_shards
from maskdiff.data.moving_digits import write_moving_digits_shards
from maskdiff.data.shards import MANIFEST_NAME
from maskdiff.data.video_writer import write_video_shards


def digits(out: str, samples_per_shard: int = 500, val_fraction: float = 1 / 6, seed: int = 0,
           progress: bool | None = None) -> dict:
    """Write scikit-learn's 1,797 real handwritten digits (8×8, grayscale PNG + ``cls``) as train/val shards.

        maskdiff shards digits data/digits

    Args:
        out: output folder; gets ``digits-{train,val}-%06d.tar`` and ``manifest.json``.
        samples_per_shard: most samples per shard.
        val_fraction: share of the digits held out for validation (seeded split).
        seed: seed of the train/val split.
        progress: a bar of the samples written on stderr; default: when stderr is a terminal (or
            ``MASKDIFF_PROGRESS=1``).
    """
    manifest = write_digits_shards(out, samples_per_shard=samples_per_shard, val_fraction=val_fraction, seed=seed,
                                   progress=progress)
    splits = ", ".join(f"{name} {split['samples']} ({split['pattern']})" for name, split in manifest["splits"].items())
    print(f"wrote {out}: {splits}")
    return manifest


def images(
    src: str,
    out: str,
    prefix: str = "images",
    max_samples: int = 1000,
    max_bytes: int | None = None,
    shuffle_seed: int | None = None,
    metadata: bool = True,
    verify: Literal["header", "decode"] = "header",
    workers: int = 8,
    progress: bool | None = None,
) -> dict:
    """Write image files (original bytes + ``cls`` + ``json`` with the source path) as WebDataset shards.

        maskdiff shards images /data/imagenet/train /data/in1k-shards --prefix imagenet-train --shuffle_seed 0

    Args:
        src: a folder with one subfolder of images per class (``SRC/<class>/*.jpg|png|webp``; sorted names
            give labels 0, 1, ...), or a text file of ``path label`` lines (or ``path`` lines: unlabelled).
        out: output folder; gets ``{prefix}-%06d.tar`` and ``manifest.json`` (other prefixes' entries are kept).
        prefix: shard file name prefix, also the split's name in the manifest (e.g. ``imagenet-train``).
        max_samples: most images per shard (ImageNet convention: 1000).
        max_bytes: also start a new shard once a shard holds this many bytes.
        shuffle_seed: write the images in a random order drawn with this seed (default: sorted order).
        metadata: add a ``json`` member with the source path (and class folder name).
        verify: check each file with PIL: ``header`` (fast) or ``decode`` (reads every pixel; also finds
            truncated files).
        workers: threads reading and checking files.
        progress: a bar of the images written on stderr; default: when stderr is a terminal (or
            ``MASKDIFF_PROGRESS=1``).
    """
    manifest = write_image_shards(
        src, out, prefix=prefix, max_samples=max_samples, max_bytes=max_bytes, shuffle_seed=shuffle_seed,
        metadata=metadata, verify=verify, workers=workers, progress=progress,
    )
    info = manifest["splits"][prefix]
    print(
        f"wrote {out}: {info['samples']} images in {len(info['shards'])} shards ({info['pattern']}), "
        f"{len(info['skipped'])} skipped"
    )
    for bad in info["skipped"][:20]:
        print(f"  skipped {bad['path']}: {bad['reason']}")
    if len(info["skipped"]) > 20:
        print(f"  ... all {len(info['skipped'])} are listed in {Path(out) / MANIFEST_NAME}")
    return manifest


def moving_digits(
    out: str,
    num_train: int = 1000,
    num_val: int = 200,
    num_frames: int = 16,
    canvas: int = 32,
    digits_per_video: int = 1,
    glyph_size: int = 16,
    fps: int = 8,
    format: Literal["mp4", "frames"] = "mp4",
    seed: int = 0,
    samples_per_shard: int = 500,
    progress: bool | None = None,
) -> dict:
    """Write seeded moving-digits videos (sklearn digits bouncing on a grayscale canvas) as train/val shards.

        maskdiff shards moving-digits data/moving-digits --format frames

    Args:
        out: output folder; gets ``moving-digits-{train,val}-%06d.tar`` and ``manifest.json``.
        num_train: training videos.
        num_val: validation videos.
        num_frames: frames per video.
        canvas: side of the square frames in px.
        digits_per_video: digits per video (the label is the first one's class).
        glyph_size: side of the upscaled 8×8 digits in px.
        fps: frame rate stored in the videos and their ``json``.
        format: ``mp4`` (lossless H.264 when available) or ``frames`` (one PNG per frame).
        seed: seed of the digits, positions and velocities.
        samples_per_shard: most videos per shard.
        progress: a bar of the videos written on stderr; default: when stderr is a terminal (or
            ``MASKDIFF_PROGRESS=1``).
    """
    manifest = write_moving_digits_shards(
        out, num_train=num_train, num_val=num_val, num_frames=num_frames, canvas=canvas,
        digits_per_video=digits_per_video, fps=fps, seed=seed, format=format, samples_per_shard=samples_per_shard,
        glyph_size=glyph_size, progress=progress,
    )
    splits = ", ".join(f"{name} {split['samples']} ({split['pattern']})" for name, split in manifest["splits"].items())
    print(f"wrote {out}: {splits}; {num_frames} frames of {canvas}x{canvas} px as {manifest['codec']}")
    return manifest


def videos(
    src: str,
    out: str,
    split: str = "train",
    samples_per_shard: int = 100,
    prefix: str = "videos",
    progress: bool | None = None,
) -> dict:
    """Write video files (original bytes + ``cls`` + ``json`` with fps/frames/duration) as WebDataset shards.

        maskdiff shards videos /data/kinetics400/train /data/k400-shards --split train --prefix k400

    Args:
        src: a folder with one subfolder of videos per class, or a text file of ``path label`` lines.
        out: output folder; gets ``{prefix}-{split}-%06d.tar`` and ``manifest.json`` (other splits are kept).
        split: split name in the manifest (``train``, ``val``, ...).
        samples_per_shard: most videos per shard (Kinetics clips are ~1-2 MB each).
        prefix: shard file name prefix.
        progress: a bar of the videos written on stderr; default: when stderr is a terminal (or
            ``MASKDIFF_PROGRESS=1``).
    """
    manifest = write_video_shards(src, out, split=split, samples_per_shard=samples_per_shard, prefix=prefix,
                                  progress=progress)
    info = manifest["splits"][split]
    print(f"wrote {out}: {split} {info['samples']} videos ({info['pattern']}), {len(info['skipped'])} skipped")
    for bad in info["skipped"]:
        print(f"  skipped {bad['path']}: {bad['reason']}")
    return manifest


def latents(
    src: str,
    out: str,
    vae: str | None = None,
    scale_factor: float = 0.18215,
    image_size: int = 256,
    flip_copies: bool = False,
    split: str = "train",
    batch_size: int = 32,
    device: str | None = None,
    samples_per_shard: int = 1000,
    prefix: str = "latents",
    dtype: Literal["float16", "float32"] = "float16",
    sample: bool = False,
    seed: int = 0,
    num_workers: int = 0,
    progress: bool | None = None,
) -> dict:
    """Encode an image shard set once with a frozen SD VAE into latent shards (``latent.npy`` + ``cls``).

        maskdiff shards latents '/data/in1k/imagenet-train-{000000..001281}.tar' /data/in1k-latents --vae /models/sd-vae-ft-ema

    Args:
        src: brace pattern of the image shards, e.g. ``/data/in1k/imagenet-train-{000000..001281}.tar``.
        out: output folder; gets ``{prefix}-{split}-%06d.tar`` and ``manifest.json`` (other splits are kept).
        vae: local directory of a diffusers AutoencoderKL (e.g. a copy of stabilityai/sd-vae-ft-ema); required.
        scale_factor: latent scale (0.18215 for the SD VAE).
        image_size: side of the centre-cropped images fed to the VAE.
        flip_copies: also store the latents of the horizontally flipped images (``latent_flip.npy``).
        split: split name in the manifest.
        batch_size: images per VAE call.
        device: where the VAE runs (default: cuda when available).
        samples_per_shard: most samples per output shard.
        prefix: shard file name prefix.
        dtype: storage dtype of the latents.
        sample: store a posterior sample instead of the posterior mean.
        seed: seed of the posterior samples.
        num_workers: DataLoader workers reading the source images.
        progress: a bar of the batches encoded on stderr; default: when stderr is a terminal (or
            ``MASKDIFF_PROGRESS=1``).
    """
    if not vae:
        raise ValueError("--vae is required: the local directory of the AutoencoderKL to encode with")
    manifest = encode_latent_shards(
        src, out, vae, scale_factor=scale_factor, image_size=image_size, flip_copies=flip_copies,
        batch_size=batch_size, device=device, samples_per_shard=samples_per_shard, prefix=prefix, split=split,
        dtype=dtype, sample=sample, seed=seed, num_workers=num_workers, progress=progress,
    )
    info = manifest["splits"][split]
    print(f"wrote {out}: {split} {info['samples']} latents {manifest['latent_channels']}x{manifest['latent_size']}"
          f"x{manifest['latent_size']} ({info['pattern']}), {info['skipped']} skipped")
    return manifest


SHARD_WRITERS = {"digits": digits, "images": images, "moving-digits": moving_digits, "videos": videos, "latents": latents}
