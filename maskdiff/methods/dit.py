"""DiT: Gaussian noise at a uniform t, ε-MSE on all tokens + L_vlb for the learned variance, DDPM-250 sampling."""

from __future__ import annotations

from maskdiff.backbones.base import Backbone
from maskdiff.corruption.base import Corruption
from maskdiff.corruption.noising import GaussianNoise
from maskdiff.methods.base import MaskDiffModule
from maskdiff.objectives.base import Objective
from maskdiff.objectives.diffusion import DiffusionLoss
from maskdiff.samplers.base import Sampler
from maskdiff.samplers.ddpm import DDPMSampler


class DiT(MaskDiffModule):
    """Peebles & Xie's recipe; every part can be replaced from YAML. ``None`` parts take DiT's defaults:
    linear schedule with T=1000, hybrid loss (ε-MSE + VLB when the backbone learns σ), DDPM with 250 respaced steps.
    Other options: :class:`~maskdiff.methods.base.MaskDiffModule`."""

    def __init__(
        self,
        backbone: Backbone,
        corruption: Corruption | None = None,
        objective: Objective | None = None,
        sampler: Sampler | None = None,
        **kwargs,
    ) -> None:
        super().__init__(
            backbone=backbone,
            corruption=corruption if corruption is not None else GaussianNoise("linear", 1000),
            objective=objective if objective is not None else DiffusionLoss("eps", learn_sigma=backbone.output_parts == 2),
            sampler=sampler if sampler is not None else DDPMSampler(250),
            **kwargs,
        )
