"""``maskdiff evaluate``: sample N images in the ADM ``.npz`` layout, record every setting, score with torch-fidelity.

Sampling (:mod:`maskdiff.evaluation.evaluate`) is independent of the world size. It runs through Lightning Fabric:
one process, or every process of ``torchrun``/``srun`` (Fabric's cluster environments read the ranks; nothing needs
exporting), whose parts are gathered on rank 0. Rank 0 writes ``samples.npz``: ``arr_0`` uint8 ``(N, H, W, 3)``
(grayscale repeated to RGB, as the ADM evaluator expects) and, for class-conditional models, ``arr_1`` the labels
``(N,)`` (ADM's ``image_sample.py`` layout), then ``preview.png`` (the first samples, one row per class) and every
setting in ``samples.json``. Scoring (references, metrics) lives in :mod:`maskdiff.evaluation.scoring`; its record
goes to ``metrics.json``.
"""

from __future__ import annotations

import json
import platform
import sys
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path
from typing import Any, Literal

import lightning
import numpy as np
import torch
import torchmetrics
from lightning.fabric import Fabric

import maskdiff
from maskdiff.autoencoders.base import Autoencoder, PixelSpace
from maskdiff.autoencoders.vae import StableDiffusionVAE
from maskdiff.data.digits import default_cache_dir
from maskdiff.evaluation.evaluate import (
    CLASS_ORDER,
    NOISE_RULE,
    batch_ranges,
    end_process_group,
    gather_rows,
    generate_samples,
    sampling_labels,
    start_fabric,
    write_preview,
)
from maskdiff.evaluation.inception import (
    INCEPTION_EXTRACTOR,
    file_sha256,
    resolve_inception_weights,
    to_inception_uint8,
)
from maskdiff.evaluation.scoring import load_samples_npz, reference_kind, score_samples, write_samples_npz
from maskdiff.files import ensure_writable_directory, write_json
from maskdiff.methods.checkpoints import load_method
from maskdiff.progress import progress as progress_bar
from maskdiff.tools.sampling import GuidanceSchedule, build_sampling

PREVIEW_NAME = "preview.png"
UINT8_RULE = "uint8 = clamp(127.5 * x + 128, 0, 255) truncated (DiT sample_ddp.py); grayscale repeated to 3 channels"


# ---------------------------------------------------------------------------------------------- records
def versions() -> dict[str, str | None]:
    """Versions of maskdiff and of the libraries its numbers depend on."""
    return {"maskdiff": maskdiff.__version__, "torch": torch.__version__, "torch_fidelity": version("torch-fidelity"),
            "torchmetrics": torchmetrics.__version__, "lightning": lightning.__version__,
            "python": platform.python_version()}


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def describe_autoencoder(autoencoder: Autoencoder) -> str | dict:
    """``"pixels"`` or the VAE's class, path and latent scale."""
    if isinstance(autoencoder, PixelSpace):
        return "pixels"
    return {"class": f"{type(autoencoder).__module__}.{type(autoencoder).__name__}",
            "path": autoencoder.path if isinstance(autoencoder, StableDiffusionVAE) else None,
            "scale_factor": autoencoder.scale_factor, "downsample": autoencoder.downsample}


def check_outputs(folder: Path, names: list[str], overwrite: bool) -> None:
    """Before any sampling: ``folder`` is writable (created if missing) and, unless ``overwrite``, holds none of
    ``names`` (``FileExistsError`` naming the first one found)."""
    ensure_writable_directory(folder, "output directory")
    existing = [folder / name for name in names if (folder / name).exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{existing[0]} exists; pass --overwrite true to replace it, or choose another --out")


# ---------------------------------------------------------------------------------------------- the command
def evaluate(
    ckpt: str | None = None,
    samples: str | None = None,
    out: str = "evaluation",
    num_samples: int = 50_000,
    cfg_scale: float | None = None,
    cfg_channels: int | Literal["all"] | None = None,
    cfg_schedule: GuidanceSchedule | None = None,
    cfg_power: float | None = None,
    sampler: Literal["ddpm", "ddim"] | None = None,
    steps: int | None = None,
    eta: float | None = None,
    preset: str | None = None,
    seed: int = 0,
    weights: Literal["ema", "raw"] = "ema",
    batch_size: int = 64,
    reference: str | None = None,
    fid: bool = True,
    isc: bool = True,
    prc: bool = True,
    inception_weights: str | None = None,
    isc_splits: int = 10,
    prc_reference: int = 10_000,
    fid_layer: Literal["2048", "768", "192", "64"] = "2048",
    device: str | None = None,
    overwrite: bool = False,
    progress: bool | None = None,
) -> dict[str, float]:
    """Sample a checkpoint into ``OUT/samples.npz`` (+ ``samples.json``) and score it into ``metrics.json``.

        maskdiff evaluate --ckpt runs/quickstart/checkpoints/last.ckpt --num_samples 1000 --fid false --out eval/quickstart

    Split sampling over processes with ``torchrun --nproc_per_node G -m maskdiff.tools.main evaluate ...`` or, in a
    SLURM job, ``srun --ntasks-per-node G maskdiff evaluate ...`` (Lightning Fabric reads the ranks from the launcher;
    ``--device cpu`` runs the processes with gloo); the samples do not depend on the number of processes. Every
    sampling option defaults to what the checkpoint configures; ``samples.json`` records what was used.

    Args:
        ckpt: maskdiff checkpoint to sample (from ``fit`` or ``convert``).
        samples: score this existing ``.npz`` (``arr_0`` uint8 NHWC) instead of sampling; results go next to it.
        out: output folder for ``samples.npz``, ``preview.png``, ``samples.json`` and ``metrics.json``.
        num_samples: N, the number of samples (50,000 for paper numbers).
        cfg_scale: classifier-free guidance scale (1 = off); default: the guidance stored with the method.
        cfg_channels: guide only the first k channels (official DiT: 3 of 4 latent channels), or ``all``;
            default: the checkpoint's.
        cfg_schedule: ``constant`` or MDT's ``power_cosine``; default: the checkpoint's (else ``constant``).
        cfg_power: exponent of the power-cosine schedule; default: the checkpoint's (else 4).
        sampler: ``ddpm`` (ancestral, respaced) or ``ddim``; default: the checkpoint's (else DDPM-250).
        steps: respaced sampling steps; default: the checkpoint sampler's.
        eta: DDIM η; default: the checkpoint's DDIM η, else 0.
        preset: a paper's sampling settings instead of the checkpoint's (``dit-xl2-cfg1.5`` for DiT's FID-50K,
            ``dit-xl2-cfg4.0``, ``mdt-xl2``, ``umd-cfg2.0``, ``umd-cfg4.0``: :mod:`maskdiff.samplers.presets`); the
            sampling options above still override their part; samples.json records the preset.
        seed: seed of the class order and of every sample's noise.
        weights: ``ema`` or ``raw`` backbone weights.
        batch_size: images per sampling and feature batch (noise is per sample: it changes samples only by float
            rounding).
        reference: ADM ``.npz`` with ``mu``/``sigma``, ``.npz`` with ``arr_0``, image folder, or shard pattern.
        fid: compute FID (needs ``reference``).
        isc: compute the Inception Score.
        prc: compute precision/recall (needs reference images: folder, shards or an npz's ``arr_0``).
        inception_weights: Inception weights file (default ``$MASKDIFF_INCEPTION_WEIGHTS``, then torch-fidelity's
            cache file); never downloaded.
        isc_splits: Inception Score splits.
        prc_reference: reference images used for precision/recall from shards or an npz's ``arr_0``.
        fid_layer: Inception features for FID: ``2048`` (standard; ADM reference statistics) or 768/192/64.
        device: torch device of a single process (default: ``cuda`` when available, else ``cpu``); under torchrun or
            srun its type only (``cuda``: each process uses ``cuda:LOCAL_RANK``; ``cpu``: gloo).
        overwrite: replace existing ``samples.npz``, ``preview.png``, ``samples.json`` or ``metrics.json``; off: an
            existing one is an error, raised before sampling.
        progress: bars of the sampling (samples of rank 0) and of the Inception features on stderr; default: when
            stderr is a terminal (or ``MASKDIFF_PROGRESS=1``), on rank 0 only.
    """
    if (ckpt is None) == (samples is None):
        raise ValueError("pass exactly one of --ckpt (sample, then score) or --samples PATH.npz (score only)")
    scoring = fid or isc or prc
    if scoring:
        if (fid or prc) and reference is None:
            raise ValueError("FID and precision/recall need --reference (ADM .npz, image folder or shard pattern); "
                             "or pass --fid false --prc false")
        weights_path = resolve_inception_weights(inception_weights)
        if reference is not None:
            reference_kind(reference)
    metrics_name = ["metrics.json"] if scoring else []
    if samples is None:
        check_outputs(Path(out).expanduser(), ["samples.npz", "samples.json", PREVIEW_NAME, *metrics_name], overwrite)
    else:
        check_outputs(Path(samples).expanduser().parent, metrics_name, overwrite)
    fabric = start_fabric(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        if samples is not None:
            if fabric.global_rank != 0:
                return {}
            samples_path = Path(samples).expanduser()
            images = load_samples_npz(samples_path)
            sidecar = samples_path.with_suffix(".json")
            sampling = json.loads(sidecar.read_text()) if sidecar.is_file() else None
        else:
            options = {"sampler": sampler, "steps": steps, "eta": eta, "cfg_scale": cfg_scale,
                       "cfg_channels": cfg_channels, "cfg_schedule": cfg_schedule, "cfg_power": cfg_power,
                       "preset": preset}
            samples_path, images, sampling = sample_to_npz(ckpt, Path(out), num_samples, options, seed, weights,
                                                           batch_size, fabric, progress)
            if fabric.global_rank != 0:
                return {}
    finally:
        end_process_group(fabric)
    if not scoring:
        return {}
    metrics = score_samples(images, reference, fid, isc, prc, weights_path, batch_size, fabric.device,
                            default_cache_dir(), isc_splits, prc_reference, fid_layer, progress=progress)
    kind = reference_kind(reference) if reference is not None else None
    record = {
        "metrics": metrics,
        "samples": str(samples_path),
        "num_samples": len(images),
        "image_size": list(images.shape[1:]),
        "reference": reference,
        "reference_kind": kind,
        "fid_from": ("reference mu/sigma + maskdiff.evaluation.frechet (scipy sqrtm)"
                     if kind in ("npz-statistics", "shards") else "torch_fidelity.calculate_metrics"),
        "evaluator": f"torch-fidelity {version('torch-fidelity')} ({INCEPTION_EXTRACTOR}, TF1 bilinear resize)",
        "inception_weights": {"path": str(weights_path), "sha256": file_sha256(weights_path)},
        "fid_layer": fid_layer,
        "isc_splits": isc_splits,
        "prc_neighborhood": 3,
        "prc_reference": prc_reference,
        "versions": versions(),
        "date": now(),
        "sampling": sampling,
    }
    write_json(samples_path.with_name("metrics.json"), record)
    for name, value in metrics.items():
        print(f"{name} {value:.6g}")
    return metrics


def sample_to_npz(ckpt: str, out: Path, num_samples: int, options: dict[str, Any], seed: int, weights: str,
                  batch_size: int, fabric: Fabric, progress: bool | None = None):
    """Sample this rank's share on ``fabric.device`` with :func:`build_sampling` ``(module, **options)``; rank 0
    gathers every share (:func:`gather_rows`, ``batch_size`` rows at a time), writes ``out/samples.npz``,
    ``out/preview.png`` and ``out/samples.json`` and returns ``(path, images (N, H, W, 3) uint8, record)``, the other
    ranks ``(None, None, None)``."""
    rank, world_size = fabric.global_rank, fabric.world_size
    counts = [sum(stop - start for start, stop in batch_ranges(num_samples, batch_size, r, world_size))
              for r in range(world_size)]  # raises before the checkpoint is loaded when a rank would get nothing
    module = load_method(ckpt, map_location="cpu").to(fabric.device).eval()
    use_ema = weights == "ema" and module.ema_backbone is not None
    if weights == "ema" and not use_ema and rank == 0:
        print(f"note: {ckpt} has no EMA weights; sampling with the raw weights", file=sys.stderr)
    sampling = build_sampling(module, **options)
    parts: list[np.ndarray] = []
    generated_channels = None
    with progress_bar(desc="sampling", total=counts[rank], unit="sample", enabled=progress) as bar:
        for _, images, _ in generate_samples(module, num_samples, seed, sampling.sampler, sampling.guidance, use_ema,
                                             None, batch_size, rank, world_size):
            generated_channels = images.shape[1]
            parts.append(to_inception_uint8(images).permute(0, 2, 3, 1).cpu().numpy())
            bar.update(len(images))
    images = gather_rows(fabric, np.concatenate(parts), counts, batch_size)
    if rank != 0:
        return None, None, None
    all_labels = sampling_labels(module, num_samples, seed)
    labels = all_labels.numpy() if all_labels is not None else None
    path = write_samples_npz(out / "samples.npz", images, labels)
    preview = write_preview(out / PREVIEW_NAME, images, labels)
    record = {
        "checkpoint": str(Path(ckpt).expanduser().resolve()),
        "checkpoint_sha256": file_sha256(ckpt)[:16],
        "method": f"{type(module).__module__}.{type(module).__name__}",
        "weights": "ema" if use_ema else "raw",
        "weights_requested": weights,
        **sampling.record,
        "clip_x0": module.clip_x0,
        "seed": seed,
        "num_samples": len(images),
        "class_order": {"num_classes": module.backbone.num_classes, "rule": CLASS_ORDER,
                        "counts": np.bincount(labels, minlength=module.backbone.num_classes).tolist()}
        if labels is not None else None,
        "noise": NOISE_RULE,
        "image_size": list(images.shape[1:]),
        "generated_channels": generated_channels,
        "grayscale_repeated": generated_channels == 1,
        "uint8": UINT8_RULE,
        "autoencoder": describe_autoencoder(module.autoencoder),
        "batch_size": batch_size,
        "world_size": world_size,
        "device": str(fabric.device),
        "preview": preview.name,
        "versions": versions(),
        "date": now(),
    }
    write_json(path.with_suffix(".json"), record)
    print(f"wrote {path} ({len(images)} samples {tuple(images.shape[1:])}, {sampling.description}, "
          f"{record['weights']} weights, seed {seed}) and its preview {preview}")
    return path, images, record
