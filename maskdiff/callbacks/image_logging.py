"""Send a picture made during training (a sample grid) to the run's image-aware loggers."""

from __future__ import annotations

import lightning as L
import numpy as np
from lightning.pytorch.loggers import Logger, TensorBoardLogger, WandbLogger


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
