"""Training-loop guards shared by every maskdiff LightningModule: step-keyed randomness and the non-finite guard.

*Step-keyed randomness.* Before every training batch the global torch, numpy and ``random`` generators are reseeded from
``(run seed, global rank, global step, micro-batch)``, the micro-batch being the batch's place in its optimizer step
under gradient accumulation (``global_step`` advances only at optimizer steps, so without it all micro-batches of a
step would draw the same masks, timesteps and noise). Everything random in a step is then a function of the step and
micro-batch alone: a run resumed from a checkpoint draws exactly what the uninterrupted
run drew, under DDP too (where Lightning would give every rank the same seed), and no generator state has to be
carried in checkpoints.

*Non-finite guard.* After backward and before the optimizer step, the loss and the gradients are checked on every
rank and the verdict is agreed over ranks (one boolean all-reduce), so all ranks act alike. ``"stop"`` raises
:class:`FloatingPointError` naming the step before anything is written, so the last good checkpoint stays as it is;
``"skip"`` drops the gradients (the optimizer leaves parameters and moments untouched; the learning-rate schedule
still advances) and stops after ``max_skipped_steps`` skips in a row.

*Weights checked before they are kept.* Finite gradients can still give non-finite weights (a learning-rate spike
overflows an update). Right after every optimizer step (and the EMA update), before any callback can save the step,
every parameter (EMA copy included) is checked. ``"stop"`` raises naming the step and the first bad tensor, so no
checkpoint holds them; ``"skip"`` restores the weights and optimizer state of before the step from a copy taken
before it (one copy of the parameters and optimizer state: the memory that ``skip`` costs) and counts the step as
skipped.
"""

from __future__ import annotations

import copy
import os
import random
from typing import Literal

import lightning as L
from lightning.pytorch.core.optimizer import LightningOptimizer
import numpy as np
import torch

NonFiniteAction = Literal["stop", "skip"]


def step_seed(run_seed: int, rank: int, step: int, micro_batch: int = 0) -> int:
    """A 63-bit seed for micro-batch ``micro_batch`` of training step ``step`` on rank ``rank`` in a run seeded with
    ``run_seed`` (micro-batch 0, the only one without gradient accumulation, keeps the seed of a plain step)."""
    entropy = [run_seed & 0xFFFFFFFF, rank, step, 0x6D61736B] + ([micro_batch] if micro_batch else [])
    state = np.random.SeedSequence(entropy).generate_state(2, np.uint32)
    return int(state[0]) << 31 ^ int(state[1])


def run_seed() -> int:
    """The seed ``seed_everything`` set for this run (``PL_GLOBAL_SEED``), 0 when it was not called."""
    return int(os.environ.get("PL_GLOBAL_SEED", "0"))


def first_nonfinite(named: dict[str, torch.Tensor]) -> str | None:
    """The name of the first floating-point tensor of ``named`` holding a NaN or infinity, or ``None``; one device
    read."""
    floating = [(name, tensor) for name, tensor in named.items() if tensor.is_floating_point() and tensor.numel()]
    if not floating:
        return None
    norms = torch._foreach_norm([tensor.detach() for _, tensor in floating])
    finite = torch.isfinite(torch.stack([norm.float().to(norms[0].device) for norm in norms])).tolist()
    return next((name for (name, _), ok in zip(floating, finite) if not ok), None)


def check_nonfinite_options(on_nonfinite: str, max_skipped_steps: int) -> None:
    if on_nonfinite not in ("stop", "skip"):
        raise ValueError(f"on_nonfinite must be 'stop' or 'skip', got {on_nonfinite!r}")
    if max_skipped_steps < 1:
        raise ValueError(f"max_skipped_steps must be at least 1, got {max_skipped_steps}")


class TrainingGuards(L.LightningModule):
    """Mixin for LightningModules: step-keyed randomness and the non-finite guard (see the module docstring).

    Subclasses set ``on_nonfinite`` and ``max_skipped_steps`` (via :meth:`init_guards`) and call
    :meth:`note_loss` with each training loss.
    """

    on_nonfinite: NonFiniteAction = "stop"
    max_skipped_steps: int = 20

    def init_guards(self, on_nonfinite: NonFiniteAction, max_skipped_steps: int) -> None:
        check_nonfinite_options(on_nonfinite, max_skipped_steps)
        self.on_nonfinite = on_nonfinite
        self.max_skipped_steps = max_skipped_steps
        self._step_loss: torch.Tensor | None = None
        self._skipped_in_a_row = 0
        self.skipped_steps = 0

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        micro_batch = batch_idx % self.trainer.accumulate_grad_batches
        seed = step_seed(run_seed(), self.global_rank, self.global_step, micro_batch)
        torch.manual_seed(seed)
        np.random.seed(seed % 2**32)  # timm's Mixup draws from numpy and random
        random.seed(seed)

    def note_loss(self, loss: torch.Tensor) -> None:
        """Keep this step's training loss; it is checked together with the gradients before the optimizer step."""
        self._step_loss = loss.detach()

    def _step_finite(self) -> tuple[bool, bool]:
        """(loss finite, loss and every gradient finite), read from the device once."""
        loss = self._step_loss
        values = [] if loss is None else [loss.float().reshape(1)]
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        values += [norm.float().reshape(1) for norm in torch._foreach_norm(grads)] if grads else []
        if not values:
            return True, True
        finite = torch.isfinite(torch.cat([v.to(values[0].device) for v in values]))
        if bool(finite.all()):
            return True, True
        return loss is None or bool(finite[0]), False

    def _agreed(self, local_ok: bool) -> bool:
        """``local_ok`` on every rank (one boolean all-reduce when there are several)."""
        return self.trainer.strategy.reduce_boolean_decision(local_ok, all=True) if self.trainer.world_size > 1 else local_ok

    def _step_name(self) -> str:
        return f"optimizer step {self.global_step + 1} (global_step {self.global_step}, epoch {self.current_epoch})"

    def _count_skip(self, where: str, what: str) -> None:
        """Count a skipped step; stop after ``max_skipped_steps`` in a row."""
        self._skipped_in_a_row += 1
        self.skipped_steps += 1
        if self._skipped_in_a_row > self.max_skipped_steps:
            raise FloatingPointError(
                f"non-finite {where} in {self._step_name()}: {self._skipped_in_a_row} steps in a row were skipped "
                f"(max_skipped_steps {self.max_skipped_steps}); stopping, the last checkpoint holds the last good weights"
            )
        self.print(f"warning: non-finite {where} in {self._step_name()}; {what} "
                   f"({self._skipped_in_a_row} in a row, {self.skipped_steps} in all)")
        self.log("train/skipped_steps", float(self.skipped_steps), on_step=True, on_epoch=False)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        loss_finite, local_ok = self._step_finite()
        if self._agreed(local_ok):
            self._skipped_in_a_row = 0
            return
        where = f"loss {float(self._step_loss)}" if not loss_finite else "gradients" if not local_ok else "gradients on another rank"
        if self.on_nonfinite == "stop":
            raise FloatingPointError(
                f"non-finite {where} in {self._step_name()}; stopped before the optimizer step, so no checkpoint holds "
                "it. Resume from the last checkpoint, e.g. with a lower learning rate or gradient_clip_val, "
                "or set on_nonfinite: skip"
            )
        for group in optimizer.param_groups:
            for param in group["params"]:
                param.grad = None
        self._count_skip(where, "skipped this optimizer step")

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer, optimizer_closure=None) -> None:
        """The optimizer step (and the EMA update of methods that keep one), then the weights' check, all before any
        callback sees the step (see the module docstring)."""
        saved = None
        torch_optimizer = optimizer.optimizer if isinstance(optimizer, LightningOptimizer) else optimizer
        if self.on_nonfinite == "skip":
            saved = ([p.detach().clone() for p in self.parameters()], copy.deepcopy(torch_optimizer.state_dict()))
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        bad = first_nonfinite(dict(self.named_parameters()))
        if self._agreed(bad is None):
            return
        where = f"weight {bad}" if bad is not None else "weights on another rank"
        if saved is None:
            raise FloatingPointError(
                f"non-finite {where} after {self._step_name()} (the loss and gradients were finite: an update "
                "overflowed); stopped before anything was saved, so the last checkpoint holds the last good weights. "
                "Resume from it with a lower learning rate, or set on_nonfinite: skip"
            )
        with torch.no_grad():
            torch._foreach_copy_(list(self.parameters()), saved[0])
        torch_optimizer.load_state_dict(saved[1])
        self._count_skip(where, "restored the weights and optimizer state of before this step")
