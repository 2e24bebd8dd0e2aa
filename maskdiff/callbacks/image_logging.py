"""Pictures made during training (sample grids, inpainting panels): written under the log directory every N steps
and at the end of fitting, and sent to the run's image-aware loggers."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from PIL import Image
from lightning.pytorch.loggers import Logger, TensorBoardLogger, WandbLogger

from maskdiff.files import save_image


def log_image(trainer: L.Trainer, tag: str, pixels: np.ndarray, step: int) -> list[Logger]:
    """Log ``pixels (H, W, 3)`` uint8 under ``tag`` at ``step`` to each of ``trainer.loggers`` that shows images:
    TensorBoard (its Images tab, one slider position per step) and Weights & Biases. Other loggers (CSV, ...) take
    none: the PNG written under the log directory is the picture. Returns the loggers that took it."""
    if pixels.ndim != 3 or pixels.shape[-1] != 3 or pixels.dtype != np.uint8:
        raise ValueError(f"log_image takes (H, W, 3) uint8 pixels, got {pixels.dtype} of shape {pixels.shape}")
    took = []
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(tag, pixels, global_step=step, dataformats="HWC")
        elif isinstance(logger, WandbLogger):
            logger.log_image(key=tag, images=[pixels], step=step)
        else:
            continue
        took.append(logger)
    return took


class PeriodicPicture(L.Callback):
    """A picture of the model every ``every_n_steps`` optimizer steps (0 = only at the end) and at the end of fitting:
    ``<log dir>/<dirname>/step_<N>.png`` / ``final.png`` (atomically) and the logger tag ``dirname``. Subclasses
    set ``every_n_steps`` and ``dirname`` and draw in :meth:`picture`."""

    every_n_steps: int
    dirname: str
    last_path: Path | None = None

    def picture(self, trainer: L.Trainer, pl_module) -> tuple[Image.Image, str]:
        """``(RGB image, what it shows)``, drawn on rank 0."""
        raise NotImplementedError

    def write(self, trainer: L.Trainer, pl_module, name: str) -> None:
        """Draw on rank 0 and save under the log directory (every rank must call: ``log_dir`` broadcasts)."""
        root = Path(trainer.log_dir or trainer.default_root_dir)
        self._write_on_rank_zero(trainer, pl_module, root / self.dirname / f"{name}.png")

    @rank_zero_only
    def _write_on_rank_zero(self, trainer: L.Trainer, pl_module, path: Path) -> None:
        image, what = self.picture(trainer, pl_module)
        self.last_path = save_image(image, path)
        log_image(trainer, self.dirname, np.asarray(image), trainer.global_step)
        rank_zero_info(f"{what}: {self.last_path}")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0:
            self.write(trainer, pl_module, f"step_{step:07d}")

    def on_fit_end(self, trainer, pl_module) -> None:
        self.write(trainer, pl_module, "final")
