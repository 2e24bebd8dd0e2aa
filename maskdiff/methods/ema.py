"""The exponential moving average of a method's backbone, updated right after every optimizer step."""

from __future__ import annotations

import copy

import lightning as L
import torch

from maskdiff.backbones.base import Backbone


def check_ema_decay(ema_decay: float | None) -> None:
    if ema_decay is not None and not 0.0 <= ema_decay < 1.0:
        raise ValueError(f"ema_decay {ema_decay} is outside [0, 1); expected e.g. 0.9999 or null to disable EMA")


class BackboneEMA(L.LightningModule):
    """Mixin for methods: ``ema_backbone``, a frozen copy of ``backbone`` that :meth:`update_ema` moves towards it by
    ``1 - ema_decay`` after each optimizer step. The copy is only ever run under an explicit ``eval()`` (generation,
    inpainting, probes); it keeps train mode otherwise."""

    backbone: Backbone
    ema_backbone: Backbone | None
    ema_decay: float | None

    def init_ema(self, backbone: Backbone, ema_decay: float | None) -> None:
        check_ema_decay(ema_decay)
        self.ema_decay = ema_decay
        self.ema_backbone = copy.deepcopy(backbone).requires_grad_(False) if ema_decay is not None else None

    @torch.no_grad()
    def update_ema(self) -> None:
        if self.ema_backbone is None:
            return
        ema_params = list(self.ema_backbone.parameters())
        live_params = list(self.backbone.parameters())
        torch._foreach_lerp_(ema_params, [p.detach().to(e.dtype) for p, e in zip(live_params, ema_params)], 1 - self.ema_decay)
        for ema_buffer, buffer in zip(self.ema_backbone.buffers(), self.backbone.buffers()):
            ema_buffer.copy_(buffer)

    def optimizer_step(self, *args, **kwargs) -> None:
        """The optimizer step, then the EMA update: both are done before any ``on_train_batch_end`` callback (such
        as a periodic ``ModelCheckpoint``) sees the step, so a checkpoint's EMA matches its weights."""
        super().optimizer_step(*args, **kwargs)
        self.update_ema()

    def inference_backbone(self, use_ema: bool = True) -> Backbone:
        """The EMA backbone when ``use_ema`` and there is one, else the live backbone."""
        return self.ema_backbone if use_ema and self.ema_backbone is not None else self.backbone
