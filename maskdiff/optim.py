"""Optimizers and learning-rate schedules used by the methods and the shipped configs (schedules per optimizer step)."""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR


class RunLengthSchedule:
    """A schedule whose length, ``total_steps``, may follow the run's: ``None`` until :meth:`follow_run` sets it
    to the trainer's number of optimizer steps (``with_scheduler`` does, in ``configure_optimizers``)."""

    total_steps: int | None

    def follow_run(self, run_steps: int, source: str) -> str | None:
        """Set ``total_steps`` to ``run_steps`` when it is ``None``; returns a warning line when it was set
        explicitly (> 0) to another number (``source`` names where ``run_steps`` came from), else ``None``."""
        if self.total_steps is None:
            self.total_steps = run_steps
            return None
        if 0 < self.total_steps != run_steps:
            return (f"the learning-rate schedule's total_steps {self.total_steps} differs from the run's {run_steps} "
                    f"steps ({source}); it keeps {self.total_steps} (total_steps: null follows the trainer)")
        return None


class WarmupCosineLR(RunLengthSchedule, LambdaLR):
    """Linear warmup from 0 over ``warmup_steps``, then half-cycle cosine to ``min_lr_ratio`` at ``total_steps``.

    Optimizer step ``k`` (from 0) trains at ``(k + warmup_offset) / warmup_steps`` of the peak while
    ``k < warmup_steps``, then at ``min + (1 - min)·½(1 + cos(π·(k - warmup)/(total - warmup)))``.
    ``total_steps = 0`` keeps the rate constant after warmup (DiT's constant learning rate); ``None`` (the default)
    follows the trainer: ``trainer.max_steps``, else ``trainer.estimated_stepping_batches``
    (:meth:`RunLengthSchedule.follow_run`).

    Args:
        warmup_offset: 1 (default) starts at ``1 / warmup_steps``; 0 starts at 0, as
            ``optax.warmup_cosine_decay_schedule`` (UMD's official trainer: its count is 0 at the first update) and
            MAE's ``lr_sched`` do.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        warmup_steps: int = 0,
        total_steps: int | None = None,
        min_lr_ratio: float = 0.0,
        warmup_offset: int = 1,
    ) -> None:
        if warmup_offset not in (0, 1):
            raise ValueError(f"warmup_offset must be 0 or 1, got {warmup_offset!r}")
        if total_steps is not None and total_steps < 0:
            raise ValueError(f"total_steps must be >= 0 (0: constant after warmup) or null (follow the trainer), "
                             f"got {total_steps}")
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.min_lr_ratio = min_lr_ratio
        self.warmup_offset = warmup_offset
        super().__init__(optimizer, self.factor)

    def factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + self.warmup_offset) / self.warmup_steps
        if self.total_steps is None or self.total_steps <= self.warmup_steps:
            return 1.0
        progress = min(1.0, (step - self.warmup_steps) / (self.total_steps - self.warmup_steps))
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def adamw(params) -> torch.optim.Optimizer:
    """The default optimizer of DiT and MDT: AdamW, lr 1e-4, no weight decay (DiT's constant-lr recipe)."""
    return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)


def mae_adamw(params) -> torch.optim.Optimizer:
    """MAE's pre-training AdamW, also UMD's and (unverified) DiffMAE's: betas (0.9, 0.95), weight decay 0.05, lr 1.5e-4
    (the base lr for a batch of 256: scale it by batch / 256)."""
    return torch.optim.AdamW(params, lr=1.5e-4, betas=(0.9, 0.95), weight_decay=0.05)
