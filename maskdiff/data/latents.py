"""Pre-encoded latent shards: encode an image shard set once with a frozen VAE, then train on the latents.

DiT and MDT train in the SD-VAE latent space; encoding every image at every step costs more than the
diffusion backbone on small models. :func:`encode_latent_shards` reads an image shard set exactly once
and writes ``latent.npy`` members (``(C, h, w)``, already multiplied by the scale factor) next to the
labels; :class:`LatentShardsDataModule` streams them back. Its ``pre_encoded = True`` tells the method
to patchify the batches as they are; the method's autoencoder is still used to decode samples.
"""

from __future__ import annotations

import io
import logging
import os
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from maskdiff.autoencoders.vae import StableDiffusionVAE
from maskdiff.progress import progress as progress_bar

from .base import ShardsDataModule
from .images import ImageShardsDataModule
from .shards import (
    MANIFEST_NAME,
    add_split_to_manifest,
    expand_urls,
    is_remote,
    local_path,
    read_manifest,
    write_shards,
)
from .streams import ImageDecoder

log = logging.getLogger("maskdiff.data")

LATENT_MEMBER = "latent.npy"
FLIPPED_LATENT_MEMBER = "latent_flip.npy"
LATENT_FORMAT_VERSION = 1
LATENT_DTYPES = ("float16", "float32")


class _KeyedImageDecoder:
    """An :class:`ImageDecoder` that also passes each sample's ``__key__``: ``((image, key), label)``."""

    def __init__(self, decoder: ImageDecoder):
        self.decoder = decoder

    def __call__(self, sample: dict, rng: random.Random | None = None):
        image, label = self.decoder(sample, rng)
        return (image, sample["__key__"]), label

    def collate(self, samples):
        """``[((image, key), label)] * B -> ((images (B, C, S, S), keys), labels (B,))``."""
        pairs = [(image, label) for (image, _), label in samples]
        images, labels = self.decoder.collate(pairs)
        return (images, [key for (_, key), _ in samples]), labels


class _SourceImages(ImageShardsDataModule):
    """The image shards to encode, read once in shard order with their keys (centre crop, no augmentation)."""

    def make_decoder(self, train: bool) -> _KeyedImageDecoder:
        return _KeyedImageDecoder(ImageDecoder(self.image_size, self.channels, self.num_classes, crop="adm_center"))


def classes_count(classes: Sequence) -> int:
    """Labels ``[0, n)`` that a manifest's ``classes`` allow: ``max + 1`` for integer labels, else one per name."""
    if all(isinstance(c, int) for c in classes):
        return max(classes) + 1
    return len(classes)


def manifest_next_to(pattern: str) -> dict | None:
    """The ``manifest.json`` in the folder of the first shard of ``pattern`` (``None``: remote or absent)."""
    url = expand_urls(pattern)[0]
    if is_remote(url):
        return None
    path = Path(local_path(url)).parent / MANIFEST_NAME
    return read_manifest(path) if path.is_file() else None


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def encode_latent_shards(
    src_pattern: str,
    out: str | Path,
    vae: str,
    scale_factor: float = 0.18215,
    image_size: int = 256,
    flip_copies: bool = False,
    batch_size: int = 32,
    device: str | None = None,
    samples_per_shard: int = 1000,
    prefix: str = "latents",
    split: str = "train",
    dtype: Literal["float16", "float32"] = "float16",
    sample: bool = False,
    seed: int = 0,
    num_classes: int | None = None,
    num_samples: int | None = None,
    num_workers: int = 0,
    progress: bool | None = None,
) -> dict:
    """Encode the images of ``src_pattern`` once with a frozen SD VAE into ``{prefix}-{split}-%06d.tar`` shards.

    Images are read in shard order without augmentation (RGB, centre-cropped to a square and resized
    to ``image_size`` with ADM's centre crop). Each output
    sample keeps the source ``__key__`` and has ``cls`` and ``latent.npy``: by default the posterior
    *mean* times ``scale_factor``, ``(C, image_size / f, image_size / f)`` in ``dtype`` (``sample=True``
    stores one posterior sample instead, drawn with ``torch.manual_seed(seed)``). ``flip_copies`` adds
    ``latent_flip.npy``, the encoding of the horizontally flipped image. Samples that fail to decode are
    skipped and counted (``splits[split]["skipped"]`` in the manifest).

    Args:
        src_pattern: brace pattern of image shards (``png/jpg/jpeg/webp`` + ``cls``).
        out: output folder; gets the shards and ``manifest.json`` (other splits already there are kept).
        vae: local directory of a diffusers ``AutoencoderKL`` (see :class:`~maskdiff.autoencoders.StableDiffusionVAE`).
        scale_factor: latent scale (0.18215 for the SD VAE); the training method's autoencoder must use the same.
        image_size: side of the square images fed to the VAE (a multiple of its downsampling factor).
        flip_copies: also store the latents of the flipped images.
        batch_size: images per VAE call.
        device: where the VAE runs (default ``"cuda"`` when available, else ``"cpu"``).
        samples_per_shard: most samples per output shard.
        prefix: shard file name prefix.
        split: name of this split in the manifest (``train``, ``val``, ...).
        dtype: storage dtype of the latents.
        sample: store a posterior sample instead of the mean.
        seed: seed of the posterior samples (``sample=True``).
        num_classes: labels must lie in ``[0, num_classes)`` (default: from the source manifest's ``classes``, else 1000).
        num_samples: samples in the source (default: from the source manifest).
        num_workers: DataLoader workers reading the source.
        progress: a bar of the batches encoded on stderr (``None``: when stderr is a terminal; see
            :mod:`maskdiff.progress`).

    Returns:
        The manifest: ``latent_channels``, ``latent_size``, ``scale_factor``, ``vae`` (path), ``classes``,
        ``image_size``, ``dtype``, ``posterior`` (``"mean"`` or ``"sample"``), ``crop`` -- which all splits
        of ``out`` must share -- and ``splits[split] = {"pattern", "samples", "shards", "skipped", "source",
        "flip_copies"}``.
    """
    if dtype not in LATENT_DTYPES:
        raise ValueError(f"dtype must be one of {LATENT_DTYPES}, got {dtype!r}")
    if not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive integer, got {image_size!r}")
    autoencoder = StableDiffusionVAE(vae, scale_factor=scale_factor, sample=sample)
    if image_size % autoencoder.downsample:
        raise ValueError(f"image_size {image_size} is not a multiple of the VAE's downsampling factor {autoencoder.downsample}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    source_manifest = manifest_next_to(src_pattern)
    if num_classes is None:
        classes = (source_manifest or {}).get("classes")
        num_classes = classes_count(classes) if classes else 1000
    source = _SourceImages(
        train_shards=src_pattern, image_size=image_size, channels=3, num_classes=num_classes, batch_size=batch_size,
        num_workers=num_workers, train_samples_per_epoch=num_samples,
    )
    latent_size = image_size // autoencoder.downsample
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    labels_seen: set[int] = set()

    def encoded_samples() -> Iterator[dict]:
        with torch.random.fork_rng(devices=[device] if str(device).startswith("cuda") else []):
            torch.manual_seed(seed)
            loader = source.train_split_once()
            batches = progress_bar(loader, desc=f"encoding {split} latents", total=loader.batches, unit="batch",
                                   enabled=progress)
            for (images, keys), labels in batches:
                if not keys:
                    continue
                images = images.to(device)
                batch = torch.cat([images, images.flip(-1)]) if flip_copies else images
                latents = autoencoder.encode(batch).float().cpu()
                for row, (key, label) in enumerate(zip(keys, labels.tolist())):
                    labels_seen.add(label)
                    sample = {"__key__": key, "cls": label, LATENT_MEMBER: _npy_bytes(latents[row].numpy().astype(dtype))}
                    if flip_copies:
                        sample[FLIPPED_LATENT_MEMBER] = _npy_bytes(latents[len(keys) + row].numpy().astype(dtype))
                    yield sample

    shards = write_shards(encoded_samples(), str(out / f"{prefix}-{split}-%06d.tar"), samples_per_shard, progress=False)
    if not shards:
        raise ValueError(f"no image of {src_pattern!r} could be encoded ({source.skipped} skipped: {dict(source.skip_reasons)})")
    names = [os.path.basename(s["path"]) for s in shards]
    entry = {
        "pattern": names[0] if len(names) == 1 else f"{prefix}-{split}-{{000000..{len(names) - 1:06d}}}.tar",
        "samples": sum(s["samples"] for s in shards),
        "shards": [{"path": name, "samples": s["samples"]} for name, s in zip(names, shards)],
        "skipped": source.skipped,
        "source": src_pattern,
        "flip_copies": flip_copies,
    }
    existing = out / MANIFEST_NAME
    earlier = read_manifest(existing).get("classes", []) if existing.is_file() else []
    classes = (source_manifest or {}).get("classes") or sorted(labels_seen | {c for c in earlier if isinstance(c, int)})
    info = {
        "name": "latents",
        "format": LATENT_FORMAT_VERSION,
        "latent_channels": int(autoencoder.latent_channels),
        "latent_size": latent_size,
        "scale_factor": scale_factor,
        "vae": str(Path(vae).expanduser().resolve()),
        "image_size": image_size,
        "dtype": dtype,
        "posterior": "sample" if sample else "mean",
        "crop": "adm_center",
    }
    if source.skipped:
        log.warning("encoding %s: skipped %d samples: %s", src_pattern, source.skipped, dict(source.skip_reasons))
    return add_split_to_manifest(out, split, entry, info, updates={"classes": classes})


class LatentDecoder:
    """Turns a latent sample into ``(latent (C, h, w) float32, label int)``.

    Reads ``latent.npy`` (or a plain ``npy`` member). In training (``rng`` given) with ``flip=True`` it
    takes ``latent_flip.npy`` instead with probability 0.5 when the sample has one. The array must have
    shape ``(channels, size, size)``; the label (``cls``) must lie in ``[0, num_classes)``.
    """

    def __init__(self, channels: int, size: int, num_classes: int, flip: bool = False):
        self.channels = channels
        self.size = size
        self.num_classes = num_classes
        self.flip = flip

    def __call__(self, sample: dict, rng: random.Random | None = None) -> tuple[torch.Tensor, int]:
        key = sample.get("__key__")
        name = LATENT_MEMBER if LATENT_MEMBER in sample else "npy"
        if name not in sample:
            members = sorted(k for k in sample if not k.startswith("__"))
            raise KeyError(f"sample {key!r} has no {LATENT_MEMBER} member: {members}")
        if "cls" not in sample:
            raise KeyError(f"sample {key!r} has no 'cls' label member")
        if rng is not None and self.flip and FLIPPED_LATENT_MEMBER in sample and rng.random() < 0.5:
            name = FLIPPED_LATENT_MEMBER
        array = np.load(io.BytesIO(sample[name]), allow_pickle=False)
        latent = torch.from_numpy(array.astype(np.float32))
        if tuple(latent.shape) != (self.channels, self.size, self.size):
            raise ValueError(
                f"sample {key!r}: {name} has shape {tuple(latent.shape)}, expected {(self.channels, self.size, self.size)}"
            )
        label = int(sample["cls"])
        if not 0 <= label < self.num_classes:
            raise ValueError(f"sample {key!r}: label {label} outside [0, {self.num_classes})")
        return latent, label

    def collate(self, samples: Sequence[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """``[(latent (C, h, w), label)] * B -> (latents (B, C, h, w), labels (B,) int64)``; B may be 0."""
        if not samples:
            return torch.empty((0, self.channels, self.size, self.size)), torch.empty(0, dtype=torch.int64)
        latents, labels = zip(*samples)
        return torch.stack(latents), torch.tensor(labels, dtype=torch.int64)


class LatentShardsDataModule(ShardsDataModule):
    """Pre-encoded VAE latents with class labels (shards written by :func:`encode_latent_shards`).

    Batches are ``(latents (B, C, h, w) float32, labels (B,) int64)``, already scaled. ``image_size``
    and ``channels`` describe the latents (``h`` and ``C``), and ``pre_encoded = True`` tells a method
    to skip its autoencoder's ``encode`` (it still decodes samples) and to check the latent shape
    directly. ``latent_size``, ``latent_channels``, ``num_classes`` and ``scale_factor`` default to the
    ``manifest.json`` next to the training shards. Streaming, epochs, evaluation and resume: see
    :class:`~maskdiff.data.base.ShardsDataModule`.

    Args:
        train_shards: brace pattern of latent training shards, e.g. ``/data/in1k-latents/latents-train-{000000..001281}.tar``.
        val_shards: brace pattern of latent validation shards, or ``None``.
        latent_size: side h of the latents (default: manifest ``latent_size``).
        latent_channels: channels C of the latents (default: manifest ``latent_channels``).
        num_classes: labels must lie in ``[0, num_classes)`` (default: from the manifest's ``classes``).
        flip: in training, use the stored flipped copy (``latent_flip.npy``) of a sample with probability 0.5.
        batch_size: training batch size per rank.
        val_batch_size: evaluation batch size per rank (default: ``batch_size``).
        num_workers: DataLoader worker processes per rank (0: load in the main process).
        shuffle_buffer: samples held in the training shuffle buffer (0 or 1: no shuffling).
        train_samples_per_epoch: samples per training epoch over all ranks; ``None`` reads the manifest.
        val_samples: evaluation samples; ``None`` reads them from the manifest.
        seed: base seed of the training stream.
        max_errors: stop the run once more than this many samples were skipped (``None``: no limit).
        stall_timeout: seconds a data reader may go without a sample (with worker processes, the loader without
            a batch) before the run stops with an error naming the shards (``None``: no bound).
    """

    pre_encoded = True

    def __init__(
        self,
        train_shards: str,
        val_shards: str | None = None,
        latent_size: int | None = None,
        latent_channels: int | None = None,
        num_classes: int | None = None,
        flip: bool = True,
        batch_size: int = 256,
        val_batch_size: int | None = None,
        num_workers: int = 4,
        shuffle_buffer: int = 1000,
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
        self.latent_size = latent_size
        self.latent_channels = latent_channels
        self._num_classes = num_classes
        self.flip = flip
        self._manifest: dict | None = None
        for name in ("latent_size", "latent_channels", "num_classes"):
            value = getattr(self, name if name != "num_classes" else "_num_classes")
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None (from the manifest), got {value!r}")

    def _from_manifest(self, key: str):
        if self._manifest is None:
            manifest = manifest_next_to(self.train_shards) if self.train_shards else None
            if manifest is None:
                raise ValueError(
                    f"{key} is not set and no manifest.json lies next to train_shards={self.train_shards!r}; "
                    "pass latent_size, latent_channels and num_classes"
                )
            self._manifest = manifest
        if key not in self._manifest:
            raise ValueError(f"the manifest next to {self.train_shards!r} has no {key!r}; pass it explicitly")
        return self._manifest[key]

    @property
    def image_size(self) -> int:
        """Side h of the latents (the backbone's ``input_size``)."""
        return self.latent_size if self.latent_size is not None else int(self._from_manifest("latent_size"))

    @property
    def channels(self) -> int:
        """Channels C of the latents (the backbone's ``in_channels``)."""
        return self.latent_channels if self.latent_channels is not None else int(self._from_manifest("latent_channels"))

    @property
    def num_classes(self) -> int:
        if self._num_classes is not None:
            return self._num_classes
        return classes_count(self._from_manifest("classes"))

    @property
    def scale_factor(self) -> float | None:
        """The scale factor the latents were multiplied by (manifest), ``None`` when unknown."""
        try:
            return float(self._from_manifest("scale_factor"))
        except ValueError:
            return None

    def make_decoder(self, train: bool) -> LatentDecoder:
        return LatentDecoder(self.channels, self.image_size, self.num_classes, flip=self.flip and train)
