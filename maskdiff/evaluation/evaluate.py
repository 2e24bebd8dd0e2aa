"""World-size-independent sampling for evaluation: the N samples of a run, split over any number of processes.

Sample ``i`` has the label ``balanced_labels(N, K, seed)[i]`` and draws all its noise from its own generator seeded
with :func:`sample_seed` ``(seed, i)``; the N samples are cut into batches of ``batch_size`` on a fixed grid and each
rank takes a contiguous run of those batches, so every sample is computed in the same batch on 1 or 64 processes.
:func:`start_fabric` joins the processes through Lightning Fabric (torchrun, srun or one process, detected by
Fabric's cluster environments) and :func:`gather_rows` brings every rank's part to rank 0 in fixed-size blocks.
:func:`write_preview` draws a grid of the first samples, one row per class.

``maskdiff evaluate`` (:mod:`maskdiff.tools.evaluate`) writes the samples as ``samples.npz``; scoring (references,
metrics, the npz layout) lives in :mod:`maskdiff.evaluation.scoring`.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from lightning.fabric import Fabric
from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

from maskdiff.images import save_grid
from maskdiff.launch.preflight import tasks_per_node
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
def launch_shape() -> tuple[int, int]:
    """``(processes per node, nodes)`` of this launch, read where the cluster environment Fabric picks reads it.

    torchrun (``TorchElasticEnvironment``) and other launchers that set ``LOCAL_RANK`` (``LightningEnvironment``):
    ``LOCAL_WORLD_SIZE`` and ``WORLD_SIZE``; srun (``SLURMEnvironment``): ``SLURM_NTASKS_PER_NODE`` (or the
    largest count of ``SLURM_TASKS_PER_NODE``) and ``SLURM_NNODES``; otherwise one process. Fabric then checks them
    against the environment, so a launch it would refuse is refused here too.
    """
    env = os.environ
    if not TorchElasticEnvironment.detect() and SLURMEnvironment.detect():
        nodes = int(env.get("SLURM_NNODES", "1"))
        counts = tasks_per_node(env)
        return (max(counts) if counts else -(-int(env["SLURM_NTASKS"]) // nodes)), nodes
    if "LOCAL_RANK" in env and "WORLD_SIZE" in env:
        world = int(env["WORLD_SIZE"])
        per_node = int(env.get("LOCAL_WORLD_SIZE", world))
        return per_node, max(1, world // per_node)
    return 1, 1


def start_fabric(device: str | torch.device) -> Fabric:
    """A launched Fabric on ``device``'s accelerator (``cpu``, ``cuda``, ``cuda:N``, ``mps``).

    Under torchrun or srun every process joins one DDP process group (gloo on CPU, NCCL on CUDA; Fabric takes the
    ranks, the main address and port from the launcher, no variable needs exporting) and uses ``cuda:LOCAL_RANK``;
    a single process uses ``device`` itself.
    """
    requested = torch.device(device)
    per_node, nodes = launch_shape()
    if per_node * nodes > 1:
        fabric = Fabric(accelerator=requested.type, devices=per_node, num_nodes=nodes, strategy="ddp")
    else:
        devices = [requested.index] if requested.index is not None and requested.type != "cpu" else 1
        fabric = Fabric(accelerator=requested.type, devices=devices, num_nodes=1)
    fabric.launch()
    return fabric


def gather_rows(fabric: Fabric, rows: np.ndarray, counts: Sequence[int], chunk: int) -> np.ndarray | None:
    """Every rank's ``rows (counts[rank], ...)`` concatenated in rank order, on rank 0 (``None`` on the others).

    The rows travel ``chunk`` at a time through ``fabric.all_gather`` of one zero-padded ``(chunk, ...)`` block per
    rank (all_gather needs one shape on every rank), so a rank holds at most ``world_size × chunk`` rows of the
    others at once: 50,000 uint8 images of 256² would be 9.8 GB per rank in one gather. ``counts`` must be known on
    every rank (:func:`batch_ranges` gives them).
    """
    if fabric.world_size == 1:
        return rows
    if len(rows) != counts[fabric.global_rank]:
        raise ValueError(f"rank {fabric.global_rank} holds {len(rows)} rows, counts say {counts[fabric.global_rank]}")
    parts: list[list[np.ndarray]] = [[] for _ in counts]
    for first in range(0, max(counts), chunk):
        block = np.zeros((chunk, *rows.shape[1:]), rows.dtype)
        piece = rows[first : first + chunk]
        block[: len(piece)] = piece
        gathered = fabric.all_gather(torch.from_numpy(block))
        if fabric.global_rank == 0:
            gathered = gathered.cpu().numpy()
            for rank, count in enumerate(counts):
                parts[rank].append(gathered[rank, : max(0, min(chunk, count - first))])
    return np.concatenate([piece for part in parts for piece in part]) if fabric.global_rank == 0 else None


def end_process_group(fabric: Fabric) -> None:
    """Leave the process group :func:`start_fabric` joined (after the last collective; rank 0 may go on alone)."""
    if fabric.world_size > 1 and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------- preview
def preview_selection(labels: np.ndarray | None, num_samples: int, per_row: int = 10,
                      rows: int = 10) -> tuple[np.ndarray, int, list[str] | None]:
    """Which samples a preview grid shows: ``(indices, images per row, row labels or None)``.

    Unconditional (``labels`` ``None``): the first ``min(N, rows × per_row)`` samples, ``per_row`` a row.
    Class-conditional: one row per class for the ``rows`` smallest labels present, sorted, each row the first ``k``
    samples of its class with ``k = min(per_row, fewest samples among those classes)`` so that every row is full.
    """
    if labels is None:
        count = min(num_samples, rows * per_row)
        return np.arange(count), min(per_row, count), None
    classes = np.unique(labels)[:rows]
    members = [np.flatnonzero(labels == label) for label in classes]
    width = min(per_row, min(len(indices) for indices in members))
    return np.concatenate([indices[:width] for indices in members]), width, [str(label) for label in classes]


def write_preview(path: str | Path, images: np.ndarray, labels: np.ndarray | None) -> Path:
    """Save :func:`preview_selection` of uint8 ``images (N, H, W, 3)`` as a PNG grid (atomically): up to 100
    samples, small images upscaled, each row labelled with its class for a class-conditional run."""
    indices, per_row, row_labels = preview_selection(labels, len(images))
    tiles = torch.from_numpy(images[indices]).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return save_grid(tiles, path, per_row, row_labels=row_labels)
