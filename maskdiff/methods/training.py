"""What every trainable maskdiff module shares: optimizer, learning-rate schedule, training guards, compilation.

The methods (:class:`~maskdiff.methods.base.MaskDiffModule` and its subclasses) and :class:`~maskdiff.methods.FineTune`
declare these options once, here, and pass them on with ``**kwargs``.
"""

from __future__ import annotations

import math
import sys
from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_only

from maskdiff.errors import UserError
from maskdiff.methods.guards import NonFiniteAction, TrainingGuards
from maskdiff.optim import RunLengthSchedule, adamw
from maskdiff.scale.compile import check_compile_kwargs


def built_by_cli() -> bool:
    """True while LightningCLI (or ``load_from_checkpoint``) instantiates a module with a config to save as hparams."""
    try:
        from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters
    except ImportError:  # pragma: no cover - older/newer Lightning without the context variable
        return False
    return _given_hyperparameters.get() is not None


@rank_zero_only
def warn(message: str) -> None:
    """Print ``warning: message`` to stderr, once (rank 0)."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


def run_length(trainer: L.Trainer) -> tuple[int | None, str]:
    """The number of optimizer steps ``trainer`` will run (``None``: endless) and where it comes from:
    ``trainer.max_steps`` when > 0, else ``trainer.estimated_stepping_batches`` (epochs x batches / accumulation)."""
    if trainer.max_steps > 0:
        return trainer.max_steps, "trainer.max_steps"
    estimated = trainer.estimated_stepping_batches
    return (int(estimated) if math.isfinite(estimated) else None), "trainer.estimated_stepping_batches"


class TrainingOptions(TrainingGuards):
    """A LightningModule with the shared training options.

    Args:
        optimizer: called with parameter groups (methods: weight decay off for 1-D params and ``no_weight_decay``).
        lr_scheduler: called with the optimizer; stepped every optimizer step. A schedule with a run length
            (:class:`~maskdiff.optim.RunLengthSchedule`, e.g. ``WarmupCosineLR``) whose ``total_steps`` is ``null``
            spans the trainer's steps; one set to another number is kept, with a warning.
        on_nonfinite: a non-finite loss or gradient ``stop``s the run before the optimizer step (the last
            checkpoint stays good) or ``skip``s that step (:mod:`maskdiff.methods.guards`).
        max_skipped_steps: with ``skip``, stop after this many skipped steps in a row.
        compile_backbone: ``torch.compile`` the backbone (only it) in ``configure_model``, when a trainer runs the
            model; state-dict keys stay the same.
        compile_kwargs: :func:`torch.compile` options, e.g. ``{mode: max-autotune}`` or ``{backend: aot_eager}``.
    """

    def __init__(
        self,
        optimizer: OptimizerCallable = adamw,
        lr_scheduler: LRSchedulerCallable | None = None,
        on_nonfinite: NonFiniteAction = "stop",
        max_skipped_steps: int = 20,
        compile_backbone: bool = False,
        compile_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.init_guards(on_nonfinite, max_skipped_steps)
        self.compile_backbone = compile_backbone
        self.compile_kwargs = check_compile_kwargs(compile_kwargs)

    def with_scheduler(self, optimizer: torch.optim.Optimizer):
        """What ``configure_optimizers`` returns: ``optimizer``, with the learning-rate schedule stepped per optimizer
        step when one is configured; a :class:`~maskdiff.optim.RunLengthSchedule` follows the attached trainer's
        length (:func:`run_length`)."""
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer)
        if isinstance(scheduler, RunLengthSchedule) and self._trainer is not None:
            steps, source = run_length(self.trainer)
            if steps is None and scheduler.total_steps is None:
                raise UserError("the learning-rate schedule follows the run's length (total_steps: null), but the run "
                                "has none (trainer.max_steps and max_epochs are -1, or the data has no length)",
                                hint="set --trainer.max_steps or the schedule's total_steps")
            mismatch = scheduler.follow_run(steps, source) if steps is not None else None
            if mismatch is not None:
                warn(mismatch)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
