"""What every trainable maskdiff module shares: optimizer, learning-rate schedule, training guards, compilation.

The methods (:class:`~maskdiff.methods.base.MaskDiffModule` and its subclasses) and :class:`~maskdiff.methods.FineTune`
declare these options once, here, and pass them on with ``**kwargs``.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from maskdiff.methods.guards import NonFiniteAction, TrainingGuards
from maskdiff.optim import adamw
from maskdiff.scale.compile import check_compile_kwargs


def built_by_cli() -> bool:
    """True while LightningCLI (or ``load_from_checkpoint``) instantiates a module with a config to save as hparams."""
    try:
        from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters
    except ImportError:  # pragma: no cover - older/newer Lightning without the context variable
        return False
    return _given_hyperparameters.get() is not None


class TrainingOptions(TrainingGuards):
    """A LightningModule with the shared training options.

    Args:
        optimizer: called with parameter groups (methods: weight decay off for 1-D params and ``no_weight_decay``).
        lr_scheduler: called with the optimizer; stepped every optimizer step.
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
        step when one is configured."""
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
