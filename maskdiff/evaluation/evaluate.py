"""``maskdiff evaluate``: sample N images in the ADM ``.npz`` layout, record every setting, score with torch-fidelity.

Sampling is independent of the world size: sample ``i`` has the label ``balanced_labels(N, K, seed)[i]`` and draws
all its noise from its own generator seeded with :func:`sample_seed` ``(seed, i)``; the N samples are cut into
batches of ``batch_size`` on a fixed grid and each rank takes a contiguous run of those batches, so every sample
is computed in the same batch on 1 or 64 processes. Under ``torchrun``/``srun`` (``WORLD_SIZE`` > 1, or
``SLURM_NTASKS`` > 1 with ``MASTER_ADDR``/``MASTER_PORT`` set) each rank writes its part next to the output and
rank 0 assembles ``samples.npz``: ``arr_0`` uint8 ``(N, H, W, 3)`` (grayscale repeated to RGB, as the ADM evaluator
expects) and, for class-conditional models, ``arr_1`` the labels ``(N,)`` (ADM's ``image_sample.py`` layout).

Scoring (references, metrics, the npz layout) lives in :mod:`maskdiff.evaluation.scoring`.
"""

from __future__ import annotations

import copy
import json
import os
import platform
import shutil
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from maskdiff.evaluation.inception import (
    INCEPTION_EXTRACTOR,
    file_sha256,
    resolve_inception_weights,
    to_inception_uint8,
)
from maskdiff.evaluation.scoring import (
    load_samples_npz,
    reference_kind,
    score_samples,
    write_samples_npz,
)
from maskdiff.samplers.base import Sampler
from maskdiff.samplers.guidance import ClassifierFreeGuidance

SEED_STRIDE = 0x9E3779B1
CLASS_ORDER = "labels = (arange(N) % num_classes)[randperm(N, generator seeded with seed)]"
NOISE_RULE = "sample i draws all its noise from torch.Generator().manual_seed((seed * 0x9E3779B1 + i) % 2**32)"
UINT8_RULE = "uint8 = clamp(127.5 * x + 128, 0, 255) truncated (DiT sample_ddp.py); grayscale repeated to 3 channels"


# ---------------------------------------------------------------------------------------------- sampling
def balanced_labels(num_samples: int, num_classes: int, seed: int) -> torch.Tensor:
    """Class labels ``(num_samples,)``: each class ``num_samples // num_classes`` or one more times, in seeded order."""
    if num_samples < 1 or num_classes < 1:
        raise ValueError(f"need num_samples >= 1 and num_classes >= 1, got {num_samples} and {num_classes}")
    order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed))
    return (torch.arange(num_samples) % num_classes)[order]


def sample_seed(seed: int, index: int) -> int:
    """Seed of sample ``index``'s noise generator (torch's CPU generator keeps 32 bits of a seed)."""
    return (seed * SEED_STRIDE + index) % 2**32


class PerSampleNoise:
    """A :meth:`Sampler.randn` replacement: row ``i`` of every noise tensor comes from generator ``i``."""

    def __init__(self, seeds: Sequence[int]) -> None:
        self.generators = [torch.Generator().manual_seed(int(seed)) for seed in seeds]

    def __call__(self, shape, generator=None, like: torch.Tensor | None = None, device=None) -> torch.Tensor:
        if shape[0] != len(self.generators):
            raise ValueError(f"noise for {shape[0]} rows requested from {len(self.generators)} per-sample generators")
        noise = torch.stack([torch.randn(tuple(shape[1:]), generator=g, dtype=torch.float32) for g in self.generators])
        return noise.to(device=device if like is None else like.device)


def with_per_sample_noise(sampler: Sampler, seeds: Sequence[int]) -> Sampler:
    """A copy of ``sampler`` whose noise for batch row ``i`` depends only on ``seeds[i]``."""
    copied = copy.copy(sampler)
    copied.randn = PerSampleNoise(seeds)
    return copied


def batch_ranges(num_samples: int, batch_size: int, rank: int = 0, world_size: int = 1) -> list[tuple[int, int]]:
    """This rank's ``[(start, stop), ...]``: a contiguous run of the fixed batches ``[k·b, min((k+1)·b, N))``.

    Raises ``ValueError`` when some rank would get no batch (every rank must hold samples for the metrics).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside [0, world_size={world_size})")
    num_batches = -(-num_samples // batch_size)
    if num_batches < world_size:
        raise ValueError(
            f"num_samples={num_samples} makes {num_batches} batch(es) of batch_size={batch_size}, fewer than "
            f"world_size={world_size} ranks; lower batch_size or raise num_samples"
        )
    first, last = rank * num_batches // world_size, (rank + 1) * num_batches // world_size
    return [(k * batch_size, min((k + 1) * batch_size, num_samples)) for k in range(first, last)]


def sampling_labels(module, num_samples: int, seed: int) -> torch.Tensor | None:
    """Balanced labels for a class-conditional ``module``, ``None`` for an unconditional one."""
    return balanced_labels(num_samples, module.backbone.num_classes, seed) if module.conditional else None


def generate_range(
    module,
    start: int,
    stop: int,
    labels: torch.Tensor | None,
    seed: int,
    sampler: Sampler,
    guidance: ClassifierFreeGuidance | None = None,
    use_ema: bool = True,
    steps: int | None = None,
) -> torch.Tensor:
    """Samples ``start..stop-1`` of a run: images ``(stop - start, C, H, W)`` in [-1, 1].

    ``labels`` are the run's labels ``(N,)`` (``None``: unconditional); sample ``i`` uses :func:`sample_seed`.
    """
    noisy = with_per_sample_noise(sampler, [sample_seed(seed, i) for i in range(start, stop)])
    batch_labels = labels[start:stop] if labels is not None else None
    return module.generate(batch_labels, num=stop - start, sampler=noisy, guidance=guidance, use_ema=use_ema, steps=steps)


def generate_samples(
    module,
    num_samples: int,
    seed: int = 0,
    sampler: Sampler | None = None,
    guidance: ClassifierFreeGuidance | None = None,
    use_ema: bool = True,
    steps: int | None = None,
    batch_size: int = 64,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor | None]]:
    """This rank's share of the run's samples, batch by batch: ``(start, images (B, C, H, W) in [-1, 1], labels)``.

    The union over ranks is the same set of images for any ``world_size`` (see the module docstring).
    """
    from maskdiff.samplers.ddpm import DDPMSampler

    sampler = sampler or module.sampler or DDPMSampler()
    labels = sampling_labels(module, num_samples, seed)
    for start, stop in batch_ranges(num_samples, batch_size, rank, world_size):
        images = generate_range(module, start, stop, labels, seed, sampler, guidance, use_ema, steps)
        yield start, images, (labels[start:stop] if labels is not None else None)


# ---------------------------------------------------------------------------------------------- distributed
@dataclass
class DistributedRun:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    started_here: bool = False

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()

    def close(self) -> None:
        if self.started_here and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def join_distributed_run(use_cuda: bool) -> DistributedRun:
    """Join the torchrun/srun process group when launched on several processes (gloo on CPU, nccl on GPU)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return DistributedRun(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    elif int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        rank, world_size = int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"])
        local_rank = int(os.environ.get("SLURM_LOCALID", "0"))
        if not (os.environ.get("MASTER_ADDR") and os.environ.get("MASTER_PORT")):
            raise RuntimeError("launched by srun on several tasks: export MASTER_ADDR and MASTER_PORT (the first node)")
    else:
        return DistributedRun()
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if use_cuda else "gloo", init_method="env://", rank=rank, world_size=world_size)
    return DistributedRun(rank, world_size, local_rank, started_here=True)


# ---------------------------------------------------------------------------------------------- records
def _versions() -> dict[str, str | None]:
    import lightning
    import torchmetrics

    import maskdiff

    try:
        import torch_fidelity

        fidelity = torch_fidelity.__version__
    except ImportError:
        fidelity = None
    return {"maskdiff": maskdiff.__version__, "torch": torch.__version__, "torch_fidelity": fidelity,
            "torchmetrics": torchmetrics.__version__, "lightning": lightning.__version__,
            "python": platform.python_version()}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def describe_autoencoder(autoencoder) -> str | dict:
    """``"pixels"`` or the VAE's class, path and latent scale."""
    from maskdiff.autoencoders.base import PixelSpace

    if isinstance(autoencoder, PixelSpace):
        return "pixels"
    return {"class": f"{type(autoencoder).__module__}.{type(autoencoder).__name__}",
            "path": getattr(autoencoder, "path", None), "scale_factor": getattr(autoencoder, "scale_factor", None),
            "downsample": getattr(autoencoder, "downsample", None)}


def describe_guidance(guidance: ClassifierFreeGuidance | None, source: str) -> dict:
    if guidance is None or not guidance.active:
        return {"scale": 1.0 if guidance is None else guidance.scale, "channels": None, "schedule": None,
                "power": None, "source": source if guidance is not None else "none"}
    return {"scale": guidance.scale, "channels": guidance.channels, "schedule": guidance.schedule,
            "power": guidance.power if guidance.schedule == "power_cosine" else None, "source": source}


def _write_json(path: Path, record: dict) -> Path:
    path.write_text(json.dumps(record, indent=2, sort_keys=False) + "\n")
    return path


# ---------------------------------------------------------------------------------------------- the command
def evaluate(
    ckpt: str | None = None,
    samples: str | None = None,
    out: str = "evaluation",
    num_samples: int = 50_000,
    cfg_scale: float | None = None,
    cfg_channels: int | None = None,
    cfg_schedule: Literal["constant", "power_cosine"] = "constant",
    cfg_power: float = 4.0,
    sampler: Literal["ddpm", "ddim"] = "ddpm",
    steps: int = 250,
    eta: float = 0.0,
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
) -> dict[str, float]:
    """Sample a checkpoint into ``OUT/samples.npz`` (+ ``samples.json``) and score it into ``metrics.json``.

    Launch with ``torchrun --nproc_per_node G -m maskdiff.cli evaluate ...`` (or ``srun``) to split sampling over
    processes; the samples do not depend on the number of processes.

    Args:
        ckpt: maskdiff checkpoint to sample (from ``fit`` or ``convert``).
        samples: score this existing ``.npz`` (``arr_0`` uint8 NHWC) instead of sampling; results go next to it.
        out: output folder for ``samples.npz``, ``samples.json`` and ``metrics.json``.
        num_samples: N, the number of samples (50,000 for paper numbers).
        cfg_scale: classifier-free guidance scale (1 = off); default: the guidance stored with the method.
        cfg_channels: guide only the first k channels (official DiT: 3 of 4 latent channels); default all.
        cfg_schedule: ``constant`` or MDT's ``power_cosine``.
        cfg_power: exponent of the power-cosine schedule.
        sampler: ``ddpm`` (ancestral, respaced) or ``ddim``.
        steps: respaced sampling steps (DiT: 250 DDPM steps).
        eta: DDIM η (ignored by ``ddpm``).
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
        device: torch device (default: ``cuda`` when available, else ``cpu``; ``cuda:LOCAL_RANK`` under torchrun).
    """
    from maskdiff.data.digits import default_cache_dir

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
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if samples is not None:
        samples_path = Path(samples).expanduser()
        images = load_samples_npz(samples_path)
        sidecar = samples_path.with_suffix(".json")
        sampling = json.loads(sidecar.read_text()) if sidecar.is_file() else None
    else:
        use_cuda = torch.device(device).type == "cuda"
        run = join_distributed_run(use_cuda)
        if run.world_size > 1 and use_cuda:
            device = f"cuda:{run.local_rank}"
        try:
            samples_path, images, sampling = _sample_to_npz(
                ckpt, Path(out), num_samples, cfg_scale, cfg_channels, cfg_schedule, cfg_power, sampler, steps, eta,
                seed, weights, batch_size, device, run,
            )
        finally:
            run.close()
        if run.rank != 0:
            return {}
    if not scoring:
        return {}
    metrics = score_samples(images, reference, fid, isc, prc, weights_path, batch_size, device,
                            default_cache_dir(), isc_splits, prc_reference, fid_layer)
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
        "evaluator": f"torch-fidelity {_versions()['torch_fidelity']} ({INCEPTION_EXTRACTOR}, TF1 bilinear resize)",
        "inception_weights": {"path": str(weights_path), "sha256": file_sha256(weights_path)},
        "fid_layer": fid_layer,
        "isc_splits": isc_splits,
        "prc_neighborhood": 3,
        "prc_reference": prc_reference,
        "versions": _versions(),
        "date": _now(),
        "sampling": sampling,
    }
    _write_json(samples_path.with_name("metrics.json"), record)
    for name, value in metrics.items():
        print(f"{name} {value:.6g}")
    return metrics


def _gather_parts(folder: Path, images: np.ndarray, labels: np.ndarray | None, run: DistributedRun):
    """Every rank writes its part to ``folder``; rank 0 returns all parts in rank order and removes them."""
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / f"rank{run.rank:05d}.npz", images=images, labels=labels if labels is not None else np.zeros(0, np.int64))
    run.barrier()
    if run.rank != 0:
        return None, None
    all_images, all_labels = [], []
    for rank in range(run.world_size):
        with np.load(folder / f"rank{rank:05d}.npz") as part:
            all_images.append(part["images"])
            all_labels.append(part["labels"])
    shutil.rmtree(folder, ignore_errors=True)
    return np.concatenate(all_images), (np.concatenate(all_labels) if labels is not None else None)


def _sample_to_npz(ckpt, out: Path, num_samples, cfg_scale, cfg_channels, cfg_schedule, cfg_power, sampler_name,
                   steps, eta, seed, weights, batch_size, device, run: DistributedRun):
    """Sample this rank's share; rank 0 assembles ``out/samples.npz`` and writes ``out/samples.json``."""
    from maskdiff.methods.checkpoints import load_method
    from maskdiff.samplers import DDIMSampler, DDPMSampler

    module = load_method(ckpt, map_location="cpu").to(device).eval()
    use_ema = weights == "ema" and module.ema_backbone is not None
    if weights == "ema" and not use_ema and run.rank == 0:
        print(f"note: {ckpt} has no EMA weights; sampling with the raw weights", file=sys.stderr)
    chosen = DDIMSampler(steps, eta) if sampler_name == "ddim" else DDPMSampler(steps)
    guidance = None if cfg_scale is None else ClassifierFreeGuidance(cfg_scale, cfg_channels, cfg_schedule, cfg_power)
    parts: list[np.ndarray] = []
    part_labels: list[np.ndarray] = []
    generated_channels = None
    for _, images, labels in generate_samples(module, num_samples, seed, chosen, guidance, use_ema, None, batch_size,
                                              run.rank, run.world_size):
        generated_channels = images.shape[1]
        parts.append(to_inception_uint8(images).permute(0, 2, 3, 1).cpu().numpy())
        if labels is not None:
            part_labels.append(labels.numpy())
    images = np.concatenate(parts)
    labels = np.concatenate(part_labels) if part_labels else None
    if run.world_size > 1:
        images, labels = _gather_parts(out / ".samples-parts", images, labels, run)
        if run.rank != 0:
            return None, None, None
    path = write_samples_npz(out / "samples.npz", images, labels)
    used_guidance = guidance if guidance is not None else module.guidance
    record = {
        "checkpoint": str(Path(ckpt).expanduser().resolve()),
        "checkpoint_sha256": file_sha256(ckpt)[:16],
        "method": f"{type(module).__module__}.{type(module).__name__}",
        "weights": "ema" if use_ema else "raw",
        "weights_requested": weights,
        "cfg": describe_guidance(used_guidance, "command line" if guidance is not None else "checkpoint"),
        "sampler": sampler_name,
        "steps": steps,
        "eta": eta if sampler_name == "ddim" else None,
        "ddpm_variance": chosen.fixed_variance if sampler_name == "ddpm" else None,
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
        "world_size": run.world_size,
        "device": str(device),
        "versions": _versions(),
        "date": _now(),
    }
    _write_json(path.with_suffix(".json"), record)
    print(f"wrote {path} ({len(images)} samples {tuple(images.shape[1:])}, {sampler_name}-{steps}, "
          f"{record['weights']} weights, seed {seed})")
    return path, images, record
