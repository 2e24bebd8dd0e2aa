"""The exponential moving average of a method's backbone, updated right after every optimizer step.

The ``n``-th update (``n = 1, 2, ...``) moves the EMA towards the live weights by ``1 - decay(n)``:

- without warm-up (``ema_warmup_power`` ``None``): ``decay(n) = ema_decay``, from the first update (official DiT
  and MDT: the EMA starts as a copy of the initial weights and decays at 0.9999 from step 0);
- with warm-up: ``decay(n) = min(ema_decay, 1 - (1 + (n - 1) / ema_warmup_gamma) ** -ema_warmup_power)``,
  timm's ``ModelEmaV3(use_warmup=True)`` rule (``get_decay(step=n)``): the first update copies the live weights,
  then the average lengthens with training (power 3/4 reaches 0.999 at about 10K updates, 2/3 at about 32K).

A constant decay ``d`` leaves ``d ** n`` of the initial (random) weights in the EMA after ``n`` updates, still 60 %
at 0.995 after 100 updates. The update count is saved in every checkpoint (``ema_updates``), so a resumed run
decays exactly as the uninterrupted one, and ``maskdiff sample``/``inpaint`` can say when an EMA is that young.
"""

from __future__ import annotations

import copy
from typing import Any

import lightning as L
import torch

from maskdiff.backbones.base import Backbone

YOUNG_EMA_START_SHARE = 0.1
"""An EMA whose weights still hold more than this share of the weights it started from is called young."""


def check_ema_decay(ema_decay: float | None) -> None:
    if ema_decay is not None and not 0.0 <= ema_decay < 1.0:
        raise ValueError(f"ema_decay {ema_decay} is outside [0, 1); expected e.g. 0.9999 or null to disable EMA")


def check_ema_warmup(ema_warmup_power: float | None, ema_warmup_gamma: float) -> None:
    if ema_warmup_power is not None and ema_warmup_power <= 0:
        raise ValueError(f"ema_warmup_power must be > 0 (e.g. 0.75, or null for no warm-up), got {ema_warmup_power}")
    if ema_warmup_gamma <= 0:
        raise ValueError(f"ema_warmup_gamma must be > 0 (e.g. 1.0), got {ema_warmup_gamma}")


def ema_decay_at(update: int, ema_decay: float, warmup_power: float | None = None, warmup_gamma: float = 1.0) -> float:
    """The decay of the ``update``-th EMA update (from 1): ``ema_decay``, or with warm-up
    ``min(ema_decay, 1 - (1 + (update - 1) / warmup_gamma) ** -warmup_power)`` (see the module docstring)."""
    if warmup_power is None:
        return ema_decay
    return min(ema_decay, 1.0 - (1.0 + (update - 1) / warmup_gamma) ** -warmup_power)


class BackboneEMA(L.LightningModule):
    """Mixin for methods: ``ema_backbone``, a frozen copy of ``backbone`` that :meth:`update_ema` moves towards it by
    ``1 - decay`` after each optimizer step (:func:`ema_decay_at`), counting the updates in ``ema_updates``. The
    copy is only ever run under an explicit ``eval()`` (generation, inpainting, probes); it keeps train mode
    otherwise."""

    backbone: Backbone
    ema_backbone: Backbone | None
    ema_decay: float | None
    ema_warmup_power: float | None
    ema_warmup_gamma: float
    ema_updates: int | None
    """Updates so far; ``None`` for weights of unknown age (a checkpoint written before the count was saved)."""

    def init_ema(self, backbone: Backbone, ema_decay: float | None, ema_warmup_power: float | None = None,
                 ema_warmup_gamma: float = 1.0) -> None:
        check_ema_decay(ema_decay)
        check_ema_warmup(ema_warmup_power, ema_warmup_gamma)
        self.ema_decay = ema_decay
        self.ema_warmup_power = ema_warmup_power
        self.ema_warmup_gamma = ema_warmup_gamma
        self.ema_updates = 0
        self.ema_backbone = copy.deepcopy(backbone).requires_grad_(False) if ema_decay is not None else None

    def current_ema_decay(self) -> float:
        """The decay the next update uses."""
        return ema_decay_at((self.ema_updates or 0) + 1, self.ema_decay, self.ema_warmup_power, self.ema_warmup_gamma)

    @torch.no_grad()
    def update_ema(self) -> None:
        if self.ema_backbone is None:
            return
        decay = self.current_ema_decay()
        ema_params = list(self.ema_backbone.parameters())
        live_params = list(self.backbone.parameters())
        torch._foreach_lerp_(ema_params, [p.detach().to(e.dtype) for p, e in zip(live_params, ema_params)], 1 - decay)
        for ema_buffer, buffer in zip(self.ema_backbone.buffers(), self.backbone.buffers()):
            ema_buffer.copy_(buffer)
        self.ema_updates = (self.ema_updates or 0) + 1

    def optimizer_step(self, *args, **kwargs) -> None:
        """The optimizer step, then the EMA update: both are done before any ``on_train_batch_end`` callback (such
        as a periodic ``ModelCheckpoint``) sees the step, so a checkpoint's EMA matches its weights."""
        super().optimizer_step(*args, **kwargs)
        self.update_ema()

    def inference_backbone(self, use_ema: bool = True) -> Backbone:
        """The EMA backbone when ``use_ema`` and there is one, else the live backbone."""
        return self.ema_backbone if use_ema and self.ema_backbone is not None else self.backbone

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.ema_backbone is not None:
            checkpoint["ema_updates"] = self.ema_updates

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the update count; a checkpoint written before it was saved counts one update per optimizer
        step (its ``global_step``), or ``None`` (unknown) without one."""
        super().on_load_checkpoint(checkpoint)
        if self.ema_backbone is not None:
            self.ema_updates = checkpoint.get("ema_updates", checkpoint.get("global_step"))

    def ema_start_share(self) -> float | None:
        """The share of the weights it started from that the EMA still holds (``prod(decay(n))`` over its
        updates: ``ema_decay ** updates`` without warm-up, 0 with warm-up, whose first update copies); ``None``
        without EMA or when the update count is unknown."""
        if self.ema_backbone is None or self.ema_updates is None:
            return None
        if self.ema_warmup_power is not None and self.ema_updates > 0:
            return 0.0
        return self.ema_decay ** self.ema_updates

    def young_ema_note(self) -> str | None:
        """One line when the EMA still holds more than :data:`YOUNG_EMA_START_SHARE` of the weights it started
        from (with a constant decay: fewer than about ``2.3 / (1 - ema_decay)`` updates), else ``None``."""
        share = self.ema_start_share()
        if share is None or share <= YOUNG_EMA_START_SHARE:
            return None
        return (f"the EMA weights are young: after {self.ema_updates} updates at decay {self.ema_decay} they still hold "
                f"{share:.0%} of the weights they started from; train longer, use --weights raw, or train with "
                f"ema_warmup_power (e.g. 0.75)")
