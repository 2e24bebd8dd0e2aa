"""Sample batches on disk and their scores: the ADM ``.npz`` layout, reference statistics and torch-fidelity metrics.

Scoring uses torch-fidelity's Inception (``inception-v3-compat``) from a local weights file
(:func:`~maskdiff.evaluation.inception.resolve_inception_weights`); nothing is downloaded. References:

- an ADM-style ``.npz`` with ``mu``/``sigma`` (pool features, e.g. ``VIRTUAL_imagenet256_labeled.npz``): FID from
  those statistics and the samples' statistics (:mod:`maskdiff.evaluation.frechet`); precision/recall against its
  ``arr_0`` images when present;
- an ``.npz`` with only ``arr_0`` images, or a folder of images: ``torch_fidelity.calculate_metrics``;
- a WebDataset shard pattern (``/data/train-{000000..000099}.tar``): read once at the samples' size, its
  statistics cached under ``$MASKDIFF_CACHE/fid_reference`` by (pattern, size, Inception weights hash).
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from maskdiff.data.digits import default_cache_dir
from maskdiff.data.images import ImageShardsDataModule
from maskdiff.evaluation.features import known_length
from maskdiff.evaluation.frechet import feature_statistics, frechet_distance
from maskdiff.files import save_npz
from maskdiff.evaluation.inception import (
    INCEPTION_EXTRACTOR,
    file_sha256,
    resolve_inception_weights,
    to_inception_uint8,
)
from maskdiff.progress import progress as progress_bar
from maskdiff.progress import progress_enabled

METRIC_NAMES = {
    "frechet_inception_distance": "fid",
    "inception_score_mean": "is",
    "inception_score_std": "is_std",
    "precision": "precision",
    "recall": "recall",
    "f_score": "f_score",
}
ANY_LABEL = 2**31 - 1

# ---------------------------------------------------------------------------------------------- npz I/O
def write_samples_npz(path: str | Path, images: np.ndarray, labels: np.ndarray | None = None) -> Path:
    """Write ``arr_0`` uint8 ``(N, H, W, 3)`` (and ``arr_1`` labels ``(N,)``) uncompressed, like ADM/DiT; atomically."""
    path = Path(path)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 images (N, H, W, 3), got {images.dtype} {images.shape}")
    arrays = [images] if labels is None else [images, np.asarray(labels, dtype=np.int64)]
    return save_npz(path, *arrays)


def load_samples_npz(path: str | Path) -> np.ndarray:
    """``arr_0`` of a sample batch: uint8 ``(N, H, W, 3)``."""
    with np.load(path) as data:
        if "arr_0" not in data:
            raise ValueError(f"{path} has no arr_0 (keys: {sorted(data.keys())}); expected the ADM sample layout")
        images = data["arr_0"]
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"{path}: arr_0 must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
    return images


class UInt8Images(Dataset):
    """A uint8 ``(N, H, W, 3)`` array as a Dataset of ``uint8 (3, H, W)`` tensors (torch-fidelity's input)."""

    def __init__(self, images: np.ndarray) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.images[index])).permute(2, 0, 1).contiguous()


# ---------------------------------------------------------------------------------------------- scoring
def _fidelity_kwargs(weights_path: Path, batch_size: int, cuda: bool, cache_dir: Path, isc_splits: int,
                     verbose: bool = False) -> dict:
    """torch-fidelity's options; ``verbose`` shows its bars ("Processing samples") and its progress lines."""
    return {
        "feature_extractor": INCEPTION_EXTRACTOR,
        "feature_extractor_weights_path": str(weights_path),
        "cuda": cuda,
        "batch_size": batch_size,
        "isc_splits": isc_splits,
        "datasets_download": False,
        "cache_root": str(cache_dir / "torch_fidelity"),
        "save_cpu_ram": not cuda,
        "verbose": verbose,
    }


def _extract_features(dataset: Dataset, layers: Sequence[str], weights_path: Path, batch_size: int,
                      cuda: bool, verbose: bool = False) -> dict[str, torch.Tensor]:
    """torch-fidelity Inception features ``{layer: (N, D)}`` of uint8 images (``"2048"``, ``"logits_unbiased"``, ...);
    ``verbose``: torch-fidelity's bar of the samples."""
    from torch_fidelity.utils import (
        create_feature_extractor,
        get_featuresdict_from_dataset,
    )

    extractor = create_feature_extractor(
        INCEPTION_EXTRACTOR, list(dict.fromkeys(layers)), cuda=cuda,
        feature_extractor_weights_path=str(weights_path), verbose=False,
    )
    return get_featuresdict_from_dataset(dataset, extractor, batch_size, cuda, not cuda, verbose)


def shard_reference_statistics(
    pattern: str,
    image_size: int,
    weights_path: Path,
    batch_size: int = 64,
    cuda: bool = False,
    cache_dir: Path | None = None,
    prc_reference: int = 10_000,
    fid_layer: str = "2048",
    num_workers: int = 2,
    progress: bool | None = None,
) -> dict[str, np.ndarray]:
    """Inception statistics of WebDataset shards read once at ``image_size`` (center crop + resize, RGB).

    Returns ``mu (D,)``, ``sigma (D, D)`` of the ``fid_layer`` features, ``num`` and the pool features
    ``prc_features (min(num, prc_reference), 2048)``; cached under ``cache_dir/fid_reference`` by
    (pattern, size, weights hash, fid_layer, prc_reference). The shards need a ``manifest.json`` listing them.
    ``progress``: a bar of the reference batches (``None``: when stderr is a terminal, see :mod:`maskdiff.progress`).
    """
    from torch_fidelity.utils import create_feature_extractor

    key = json.dumps({"pattern": pattern, "size": image_size, "weights_sha256": file_sha256(weights_path),
                      "fid_layer": fid_layer, "prc_reference": prc_reference, "version": 1}, sort_keys=True)
    path = Path(cache_dir or default_cache_dir()) / "fid_reference" / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.npz"
    if path.is_file():
        with np.load(path) as cached:
            return {name: cached[name] for name in cached.files}
    # Labels are not used; any non-negative label is accepted.
    data = ImageShardsDataModule(train_shards=pattern, image_size=image_size, channels=3, num_classes=ANY_LABEL,
                                 batch_size=batch_size, num_workers=num_workers)
    layers = list(dict.fromkeys([fid_layer, "2048"]))
    extractor = create_feature_extractor(INCEPTION_EXTRACTOR, layers, cuda=cuda,
                                         feature_extractor_weights_path=str(weights_path), verbose=False)
    dims = int(fid_layer)
    total = torch.zeros(dims, dtype=torch.float64)
    outer = torch.zeros(dims, dims, dtype=torch.float64)
    kept: list[torch.Tensor] = []
    num = 0
    batches = data.train_split_once()
    with torch.no_grad(), progress_bar(batches, desc="reference statistics", total=known_length(batches),
                                       unit="batch", enabled=progress) as bar:
        for images, _ in bar:
            if len(images) == 0:
                continue
            pixels = to_inception_uint8(images)
            found = dict(zip(layers, extractor(pixels.cuda() if cuda else pixels)))
            features = found[fid_layer].double().cpu()
            total += features.sum(0)
            outer += features.T @ features
            num += len(features)
            if sum(len(k) for k in kept) < prc_reference:
                kept.append(found["2048"].float().cpu())
    if num < 2:
        raise ValueError(f"reference shards {pattern!r} gave {num} image(s); FID needs at least 2")
    mu = total / num
    sigma = (outer - num * torch.outer(mu, mu)) / (num - 1)
    stats = {"mu": mu.numpy(), "sigma": sigma.numpy(), "num": np.asarray(num),
             "prc_features": torch.cat(kept)[:prc_reference].numpy()}
    save_npz(path, **stats)
    return stats


def reference_kind(reference: str) -> str:
    """``npz-statistics``, ``npz-images``, ``folder`` or ``shards``."""
    path = Path(reference).expanduser()
    if path.is_dir():
        return "folder"
    if path.suffix == ".npz":
        if not path.is_file():
            raise FileNotFoundError(f"reference npz not found: {path}")
        with np.load(path) as data:
            if {"mu", "sigma"} <= set(data.files):
                return "npz-statistics"
            if "arr_0" in data.files:
                return "npz-images"
        raise ValueError(f"reference {path} has neither mu/sigma nor arr_0 (keys: {sorted(data.files)})")
    if ".tar" in reference:
        return "shards"
    raise ValueError(
        f"reference {reference!r} is not an existing folder, an .npz (mu/sigma or arr_0) or a .tar shard pattern"
    )


def score_samples(
    samples: np.ndarray,
    reference: str | None,
    fid: bool = True,
    isc: bool = True,
    prc: bool = True,
    weights_path: str | Path | None = None,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    cache_dir: str | Path | None = None,
    isc_splits: int = 10,
    prc_reference: int = 10_000,
    fid_layer: Literal["2048", "768", "192", "64"] = "2048",
    progress: bool | None = None,
) -> dict[str, float]:
    """FID / IS / precision-recall of uint8 samples ``(N, H, W, 3)`` against ``reference`` (torch-fidelity's Inception).

    FID uses the ``fid_layer`` features (2048: the standard pool features), precision/recall the 2048 pool
    features, IS the 1008 ``logits_unbiased``. Returns a subset of ``fid``, ``is``, ``is_std``, ``precision``,
    ``recall``, ``f_score``. ``progress``: torch-fidelity's bars of the Inception features and ours of the reference
    shards (``None``: when stderr is a terminal, on rank 0; see :mod:`maskdiff.progress`).
    """
    from torch_fidelity import calculate_metrics
    from torch_fidelity.metric_isc import isc_features_to_metric
    from torch_fidelity.metric_prc import prc_features_to_metric

    if (fid or prc) and reference is None:
        raise ValueError("FID and precision/recall need a reference (--reference), or pass --fid false --prc false")
    if not (fid or isc or prc):
        return {}
    weights_path = resolve_inception_weights(weights_path)
    cache_dir = Path(cache_dir or default_cache_dir())
    cuda = torch.device(device).type == "cuda"
    if fid_layer not in ("2048", "768", "192", "64"):
        raise ValueError(f"fid_layer must be one of '2048', '768', '192', '64', got {fid_layer!r}")
    verbose = progress_enabled(progress)
    options = _fidelity_kwargs(weights_path, batch_size, cuda, cache_dir, isc_splits, verbose)
    options["feature_layer_fid"] = fid_layer
    kind = reference_kind(reference) if reference is not None else None
    dataset = UInt8Images(samples)

    if kind in ("folder", "npz-images") or kind is None:
        reference_input = None
        if kind == "folder":
            reference_input = str(Path(reference).expanduser())
        elif kind == "npz-images":
            reference_input = UInt8Images(load_samples_npz(reference))
        found = calculate_metrics(input1=dataset, input2=reference_input, fid=fid, isc=isc, prc=prc, **options)
        return {METRIC_NAMES[name]: float(value) for name, value in found.items() if name in METRIC_NAMES}

    if kind == "npz-statistics":
        with np.load(Path(reference).expanduser()) as data:
            mu, sigma = data["mu"], data["sigma"]
            reference_images = data["arr_0"] if prc and "arr_0" in data.files else None
        reference_prc = None
        if reference_images is not None:
            reference_prc = _extract_features(UInt8Images(reference_images[:prc_reference]), ["2048"], weights_path,
                                              batch_size, cuda, verbose)["2048"]
    else:
        stats = shard_reference_statistics(reference, samples.shape[1], weights_path, batch_size, cuda, cache_dir,
                                           prc_reference, fid_layer, progress=verbose)
        mu, sigma, reference_prc = stats["mu"], stats["sigma"], torch.from_numpy(stats["prc_features"])
    if fid and mu.shape != (int(fid_layer),):
        raise ValueError(f"reference {reference} holds statistics of {mu.shape[0]}-d features, fid_layer is {fid_layer}")

    layers = ([fid_layer] if fid else []) + (["logits_unbiased"] if isc else []) + (["2048"] if prc else [])
    features = _extract_features(dataset, layers, weights_path, batch_size, cuda, verbose)
    metrics: dict[str, float] = {}
    if fid:
        metrics["fid"] = frechet_distance(*feature_statistics(features[fid_layer]), mu, sigma)
    if isc:
        found = isc_features_to_metric(features["logits_unbiased"], isc_splits, True, 2020)
        metrics.update({METRIC_NAMES[name]: float(value) for name, value in found.items()})
    if prc:
        if reference_prc is None:
            print(f"note: {reference} holds statistics but no arr_0 images; precision/recall skipped", file=sys.stderr)
        else:
            found = prc_features_to_metric(features["2048"], reference_prc, **options)
            metrics.update({METRIC_NAMES[name]: float(value) for name, value in found.items()})
    return metrics
