"""The embedded default data set: scikit-learn's 1,797 real 8×8 handwritten digits as WebDataset shards."""

from __future__ import annotations

import io
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from .shards import (
    MANIFEST_NAME,
    brace_pattern,
    read_manifest,
    write_manifest,
    write_shards,
)

DIGITS_FORMAT_VERSION = 1
SPLITS = ("train", "val")


def digits_pixels(values: np.ndarray) -> np.ndarray:
    """Scale sklearn digit values 0..16 to uint8 0..255 with ``round(v * 255 / 16)`` (half to even)."""
    return np.round(np.asarray(values, dtype=np.float64) * 255 / 16).astype(np.uint8)


def _png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def split_indices(num_samples: int, val_fraction: float, seed: int) -> dict[str, np.ndarray]:
    """A seeded random split of ``range(num_samples)``: ``{"train": idx, "val": idx}`` (each ascending)."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    order = np.random.default_rng(seed).permutation(num_samples)
    num_val = int(round(num_samples * val_fraction))
    return {"train": np.sort(order[num_val:]), "val": np.sort(order[:num_val])}


def write_digits_shards(
    out_dir: str | Path,
    samples_per_shard: int = 500,
    val_fraction: float = 1 / 6,
    seed: int = 0,
    progress: bool | None = None,
) -> dict:
    """Write sklearn's digits as ``digits-{train,val}-%06d.tar`` shards plus ``manifest.json``.

    Each sample is ``{"__key__": "%04d" % sklearn_index, "png": 8×8 grayscale PNG, "cls": label}``.
    The same arguments give byte-identical files. ``progress``: a bar of the samples written on stderr (``None``: when
    stderr is a terminal; see :mod:`maskdiff.progress`).

    Returns:
        The manifest: ``classes`` (0..9), ``total`` (1797), ``image_size`` (8), ``channels`` (1) and
        ``splits[name] = {"pattern", "samples", "shards": [{"path", "samples"}]}`` with paths relative
        to ``out_dir``.
    """
    from sklearn.datasets import load_digits

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    digits = load_digits()
    pixels = digits_pixels(digits.images)
    labels = digits.target.astype(int)
    manifest = {
        "name": "sklearn-digits",
        "format": DIGITS_FORMAT_VERSION,
        "seed": seed,
        "val_fraction": val_fraction,
        "image_size": int(pixels.shape[1]),
        "channels": 1,
        "classes": sorted(int(c) for c in np.unique(labels)),
        "total": int(len(labels)),
        "splits": {},
    }
    for split, indices in split_indices(len(labels), val_fraction, seed).items():
        samples = [{"__key__": f"{i:04d}", "png": _png_bytes(pixels[i]), "cls": int(labels[i])} for i in indices]
        shards = write_shards(samples, str(out_dir / f"digits-{split}-%06d.tar"), samples_per_shard, progress=progress)
        manifest["splits"][split] = {
            "pattern": brace_pattern(f"digits-{split}", len(shards)),
            "samples": len(samples),
            "shards": [{"path": os.path.basename(s["path"]), "samples": s["samples"]} for s in shards],
        }
    write_manifest(out_dir / MANIFEST_NAME, manifest)
    return manifest


def default_cache_dir() -> Path:
    """``$MASKDIFF_CACHE`` or ``~/.cache/maskdiff``."""
    return Path(os.environ.get("MASKDIFF_CACHE") or Path.home() / ".cache" / "maskdiff").expanduser()


def _complete_manifest(root: Path) -> dict | None:
    path = root / MANIFEST_NAME
    if not path.is_file():
        return None
    manifest = read_manifest(path)
    if manifest.get("format") != DIGITS_FORMAT_VERSION:
        return None
    shards = [s["path"] for split in manifest["splits"].values() for s in split["shards"]]
    if not all((root / name).is_file() for name in shards):
        return None
    manifest["root"] = str(root.resolve())
    return manifest


def ensure_digits_shards(cache_dir: str | Path | None = None) -> dict:
    """The digits manifest, writing the shards to ``<cache_dir>/digits/`` on first use.

    ``cache_dir`` defaults to :func:`default_cache_dir`. The returned manifest has an extra ``root``
    key: the absolute shard folder that the manifest's relative paths and patterns refer to.

    Safe to call from several processes at once (DDP ranks): each writer fills a private temporary
    folder and renames it into place atomically; a process that loses the race discards its copy.
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    root = root / "digits"
    manifest = _complete_manifest(root)
    if manifest is not None:
        return manifest
    if root.exists() and any(root.iterdir()):
        manifest = _complete_manifest(root)
        if manifest is not None:
            return manifest
        raise RuntimeError(
            f"{root} exists but holds no complete digits shards (format {DIGITS_FORMAT_VERSION}); delete it"
        )
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".digits-", dir=root.parent))
    try:
        write_digits_shards(tmp)
        tmp.chmod(0o755)
        try:
            os.rename(tmp, root)
        except OSError:
            if _complete_manifest(root) is None:
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    manifest = _complete_manifest(root)
    if manifest is None:
        raise RuntimeError(f"digits shards at {root} are incomplete after writing")
    return manifest
