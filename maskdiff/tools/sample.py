"""``maskdiff sample``: a PNG grid of samples from a checkpoint, with the checkpoint's sampler unless overridden."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Literal

import torch

from maskdiff.callbacks.sample_grid import grid_labels, save_grid
from maskdiff.errors import UserError
from maskdiff.files import ensure_writable_directory, image_format
from maskdiff.methods.base import MaskDiffModule
from maskdiff.methods.checkpoints import load_method
from maskdiff.progress import sampling_progress
from maskdiff.tools.sampling import GuidanceSchedule, build_sampling


def sample_labels(module: MaskDiffModule, classes: list[int] | None, per_class: int) -> torch.Tensor | None:
    """The grid's labels: each of ``classes`` (default: the first 10) ``per_class`` times, or ``None`` for an
    unconditional model. A class id must lie in ``[0, num_classes)`` (``num_classes`` is the null label of
    classifier-free guidance, not a class), and an unconditional model takes none."""
    num_classes = module.backbone.num_classes
    if not module.conditional:
        if classes is not None:
            raise UserError(f"--classes {classes}: this checkpoint's model is unconditional (num_classes 0)",
                            hint="drop --classes; --num sets how many samples it draws")
        return None
    classes = classes if classes is not None else list(range(min(num_classes, 10)))
    if not classes:
        raise UserError("--classes is empty; give class ids such as [0,1,2] or leave it out")
    outside = [label for label in classes if not 0 <= label < num_classes]
    if outside:
        null = f" ({num_classes} is the null label of classifier-free guidance)" if num_classes in outside else ""
        raise UserError(f"--classes {outside} outside [0, {num_classes}): the model has {num_classes} classes{null}")
    return grid_labels(classes, per_class)


def sample(
    ckpt: str,
    out: str = "samples.png",
    classes: list[int] | None = None,
    per_class: int = 8,
    num: int = 16,
    sampler: Literal["ddpm", "ddim"] | None = None,
    steps: int | None = None,
    eta: float | None = None,
    cfg_scale: float | None = None,
    cfg_channels: int | Literal["all"] | None = None,
    cfg_schedule: GuidanceSchedule | None = None,
    cfg_power: float | None = None,
    preset: str | None = None,
    seed: int = 0,
    weights: Literal["ema", "raw"] = "ema",
    device: str = "cpu",
    progress: bool | None = None,
) -> str:
    """Generate a PNG grid from a checkpoint: one row per class, ``per_class`` samples per row.

        maskdiff sample --ckpt runs/quickstart/checkpoints/last.ckpt --out grid.png --sampler ddim --steps 50

    Every sampling option defaults to what the checkpoint configures (UMD: DDIM-125, η = 1; a method without a
    sampler: DDPM-250); the one used is printed.

    Args:
        ckpt: maskdiff checkpoint (from ``fit`` or ``convert``).
        out: PNG path to write.
        classes: class ids in ``[0, num_classes)``, one row each (default: the first 10 classes; an
            unconditional model takes none).
        per_class: samples per row.
        num: samples of an unconditional model.
        sampler: ``ddpm`` (ancestral, respaced) or ``ddim``; default: the checkpoint's.
        steps: respaced sampling steps; default: the checkpoint sampler's.
        eta: DDIM η (0 = deterministic); default: the checkpoint's DDIM η, else 0.
        cfg_scale: classifier-free guidance scale (1 = off); default: the guidance stored with the method
            (e.g. MDT's power-cosine 3.8), or none.
        cfg_channels: guide only the first k channels (official DiT: 3), or ``all``; default: the checkpoint's.
        cfg_schedule: ``constant`` or MDT's ``power_cosine``; default: the checkpoint's (else ``constant``).
        cfg_power: exponent of the power-cosine schedule; default: the checkpoint's (else 4).
        preset: a paper's sampling settings instead of the checkpoint's (``dit-xl2-cfg1.5``, ``dit-xl2-cfg4.0``,
            ``mdt-xl2``, ``umd-cfg2.0``, ``umd-cfg4.0``: :mod:`maskdiff.samplers.presets`); the options above still
            override their part.
        seed: noise seed; the same seed and weights give the same image.
        weights: ``ema`` or ``raw`` backbone weights.
        device: torch device to sample on.
        progress: a bar of the sampling steps on stderr; default: when stderr is a terminal (or
            ``MASKDIFF_PROGRESS=1``).
    """
    if per_class < 1 or num < 1:
        raise UserError(f"--per_class and --num must be at least 1, got {per_class} and {num}")
    image_format(out)
    ensure_writable_directory(Path(out).expanduser().parent, "--out directory")
    module = load_method(ckpt, map_location=device).to(device).eval()
    if weights == "ema" and module.ema_backbone is None:
        print(f"note: {ckpt} has no EMA weights; sampling with the raw weights", file=sys.stderr)
    elif weights == "ema" and module.young_ema_note() is not None:
        print(f"warning: {ckpt}: {module.young_ema_note()}", file=sys.stderr)
    labels = sample_labels(module, classes, per_class)
    sampling = build_sampling(module, sampler, steps, eta, cfg_scale, cfg_channels, cfg_schedule, cfg_power, preset)
    count = num if labels is None else len(labels)
    description = f"sampling {count} image{'s' * (count != 1)}"
    bar, advance = sampling_progress(module.sampling_steps(sampling.sampler), description, progress)
    with bar:
        images = module.generate(
            labels, num=num, sampler=sampling.sampler, guidance=sampling.guidance,
            generator=torch.Generator().manual_seed(seed), use_ema=weights == "ema", callback=advance,
        )
    row_labels = None if labels is None else [str(label) for label in labels[::per_class].tolist()]
    path = save_grid(images, out, per_class, row_labels=row_labels)
    print(f"wrote {path} ({images.shape[0]} samples, {sampling.description}, seed {seed}, {weights} weights)")
    return str(path)
