"""DiT: Gaussian noise at a uniform t, ε-MSE on all tokens + L_vlb for the learned variance, DDPM-250 sampling."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from maskdiff.autoencoders.base import Autoencoder
from maskdiff.backbones.base import Backbone
from maskdiff.corruption.base import Corruption
from maskdiff.corruption.noising import GaussianNoise
from maskdiff.methods.base import MaskDiffModule, default_optimizer
from maskdiff.methods.guards import NonFiniteAction
from maskdiff.objectives.base import Objective
from maskdiff.objectives.diffusion import DiffusionLoss
from maskdiff.samplers.base import Sampler
from maskdiff.samplers.ddpm import DDPMSampler
from maskdiff.samplers.guidance import ClassifierFreeGuidance


class DiT(MaskDiffModule):
    """Peebles & Xie's recipe; every part can be replaced from YAML. ``None`` parts take DiT's defaults:
    linear schedule with T=1000, hybrid loss (ε-MSE + VLB), DDPM with 250 respaced steps."""

    def __init__(
        self,
        backbone: Backbone,
        corruption: Corruption | None = None,
        objective: Objective | None = None,
        sampler: Sampler | None = None,
        guidance: ClassifierFreeGuidance | None = None,
        autoencoder: Autoencoder | None = None,
        optimizer: OptimizerCallable = default_optimizer,
        lr_scheduler: LRSchedulerCallable | None = None,
        ema_decay: float | None = 0.9999,
        clip_x0: float | None = None,
        on_nonfinite: NonFiniteAction = "stop",
        max_skipped_steps: int = 20,
        compile_backbone: bool = False,
        compile_kwargs: dict[str, Any] | None = None,
    ) -> None:
        learn_sigma = getattr(backbone, "learn_sigma", True)
        super().__init__(
            backbone=backbone,
            corruption=corruption if corruption is not None else GaussianNoise("linear", 1000),
            objective=objective if objective is not None else DiffusionLoss("eps", learn_sigma=learn_sigma),
            sampler=sampler if sampler is not None else DDPMSampler(250),
            guidance=guidance,
            autoencoder=autoencoder,
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            ema_decay=ema_decay,
            clip_x0=clip_x0,
            on_nonfinite=on_nonfinite,
            max_skipped_steps=max_skipped_steps,
            compile_backbone=compile_backbone,
            compile_kwargs=compile_kwargs,
        )
