"""Write a PNG grid of generated samples (one row per class) during and after training."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch

from maskdiff.callbacks.image_logging import PeriodicPicture
from maskdiff.images import grid_image, save_grid
from maskdiff.samplers.base import Sampler
from maskdiff.samplers.guidance import ClassifierFreeGuidance

__all__ = ["SampleGrid", "grid_labels", "save_grid"]


def grid_labels(classes: list[int], per_class: int) -> torch.Tensor:
    """Labels for a grid with one row per class: ``(len(classes) * per_class,)``."""
    return torch.tensor(classes).repeat_interleave(per_class)


class SampleGrid(PeriodicPicture):
    """Generate a fixed-noise grid with EMA weights every ``every_n_steps`` and at the end of fitting: a PNG under
    the log directory (small images upscaled to 64 px, each row labelled with its class when the model is
    conditional) that also goes to the run's TensorBoard or W&B logger under the tag ``dirname``.

    Args:
        every_n_steps: generate every N optimizer steps (0 = only at the end).
        classes: one row per class (``None`` = all classes of the backbone, at most 10; unconditional models
            get ``len(classes)`` rows of samples).
        per_class: samples per row.
        sampler: overrides the module's sampler (e.g. a faster DDIM for in-training grids).
        cfg_scale: classifier-free guidance scale (1 = off); ``None`` uses the method's own guidance.
        seed: noise seed; the same seed gives the same grid for the same weights.
        use_ema: sample with the EMA backbone when there is one.
        dirname: folder under the logger's directory, and the image's tag in TensorBoard or W&B.
    """

    def __init__(
        self,
        every_n_steps: int = 0,
        classes: list[int] | None = None,
        per_class: int = 8,
        sampler: Sampler | None = None,
        cfg_scale: float | None = None,
        seed: int = 0,
        use_ema: bool = True,
        dirname: str = "samples",
    ) -> None:
        self.every_n_steps = every_n_steps
        self.classes = classes
        self.per_class = per_class
        self.sampler = sampler
        self.cfg_scale = cfg_scale
        self.seed = seed
        self.use_ema = use_ema
        self.dirname = dirname
        self.last_path: Path | None = None

    def _classes(self, pl_module) -> list[int]:
        if self.classes is not None:
            return list(self.classes)
        return list(range(min(max(pl_module.backbone.num_classes, 1), 10)))

    def generate(self, pl_module) -> torch.Tensor:
        classes = self._classes(pl_module)
        labels = grid_labels(classes, self.per_class) if pl_module.conditional else None
        guidance = None if self.cfg_scale is None else ClassifierFreeGuidance(self.cfg_scale)
        return pl_module.generate(
            labels,
            num=len(classes) * self.per_class,
            sampler=self.sampler,
            guidance=guidance,
            generator=torch.Generator().manual_seed(self.seed),
            use_ema=self.use_ema,
        )

    def picture(self, trainer: L.Trainer, pl_module):
        row_labels = [str(label) for label in self._classes(pl_module)] if pl_module.conditional else None
        return grid_image(self.generate(pl_module), self.per_class, row_labels), "sample grid"
