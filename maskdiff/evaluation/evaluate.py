"""World-size-independent sampling for evaluation: the N samples of a run, split over any number of processes.

Sample ``i`` has the label ``balanced_labels(N, K, seed)[i]`` and draws all its noise from its own generator seeded
with :func:`sample_seed` ``(seed, i)``; the N samples are cut into batches of ``batch_size`` on a fixed grid and each
rank takes a contiguous run of those batches, so every sample is computed in the same batch on 1 or 64 processes.
Under ``torchrun``/``srun`` (``WORLD_SIZE`` > 1, or ``SLURM_NTASKS`` > 1 with ``MASTER_ADDR``/``MASTER_PORT`` set)
:func:`join_distributed_run` joins the process group and :func:`gather_parts` brings every rank's part to rank 0.

``maskdiff evaluate`` (:mod:`maskdiff.tools.evaluate`) writes the samples as ``samples.npz``; scoring (references,
metrics, the npz layout) lives in :mod:`maskdiff.evaluation.scoring`.
"""

from __future__ import annotations

import copy
import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from maskdiff.files import save_npz
from maskdiff.samplers.base import Sampler
from maskdiff.samplers.guidance import ClassifierFreeGuidance

SEED_STRIDE = 0x9E3779B1
CLASS_ORDER = "labels = (arange(N) % num_classes)[randperm(N, generator seeded with seed)]"
NOISE_RULE = "sample i draws all its noise from torch.Generator().manual_seed((seed * 0x9E3779B1 + i) % 2**32)"


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
    sampler = module.chosen_sampler(sampler)
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


def gather_parts(folder: Path, images: np.ndarray, labels: np.ndarray | None,
                 run: DistributedRun) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Every rank writes its part (images ``(n, H, W, 3)`` uint8, labels ``(n,)`` or ``None``) to ``folder``; rank 0
    returns all parts in rank order and removes them, the other ranks get ``(None, None)``."""
    folder.mkdir(parents=True, exist_ok=True)
    save_npz(folder / f"rank{run.rank:05d}.npz", images=images, labels=labels if labels is not None else np.zeros(0, np.int64))
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
