"""MDT: DiT trained with mask latent modelling: a full pass and a masked pass per step, losses summed.

At inference the backbone runs unmasked (no side-interpolater); guidance defaults to MDT's power-cosine schedule.
"""

from __future__ import annotations

from maskdiff.backbones.base import Backbone
from maskdiff.corruption.base import Corruption
from maskdiff.corruption.noising import MaskedNoise
from maskdiff.methods.base import MaskDiffModule
from maskdiff.objectives.base import Objective
from maskdiff.objectives.diffusion import DiffusionLoss
from maskdiff.samplers.base import Sampler
from maskdiff.samplers.ddpm import DDPMSampler
from maskdiff.samplers.guidance import ClassifierFreeGuidance


class MDT(MaskDiffModule):
    """Gao et al.'s recipe. ``None`` parts take MDT's defaults: ``MaskedNoise(0.3)`` (two views, same t,
    independent noise), the DiT hybrid loss on all tokens of both views (summed), DDPM-250 and power-cosine
    guidance (scale 3.8, power 4) on the first 3 channels, as the official ``forward_with_cfg``. For MDTv2 set ``max_mask_ratio: 0.5`` and ``weighting: min_snr`` in YAML.
    Other options: :class:`~maskdiff.methods.base.MaskDiffModule`."""

    def __init__(
        self,
        backbone: Backbone,
        corruption: Corruption | None = None,
        objective: Objective | None = None,
        sampler: Sampler | None = None,
        guidance: ClassifierFreeGuidance | None = None,
        **kwargs,
    ) -> None:
        super().__init__(
            backbone=backbone,
            corruption=corruption if corruption is not None else MaskedNoise(0.3),
            objective=objective if objective is not None else DiffusionLoss("eps", learn_sigma=backbone.output_parts == 2),
            sampler=sampler if sampler is not None else DDPMSampler(250),
            guidance=guidance if guidance is not None else ClassifierFreeGuidance(3.8, 3, "power_cosine", 4.0),
            **kwargs,
        )
