"""DiffMAE: diffusion models as masked autoencoders (Wei et al., ICCV 2023), for images and video.

Hide most patch tokens, noise only the hidden ones, encode the clean visible ones, and train the decoder to predict
the hidden tokens' clean pixels (x0 MSE on the hidden tokens). Inpainting is native (``inpainting: hidden_chain``):
the encoder runs once on the known tokens and the reverse chain runs on the hidden tokens only.
"""

from __future__ import annotations

from lightning.pytorch.cli import OptimizerCallable

from maskdiff.backbones.base import Backbone
from maskdiff.corruption.base import Corruption
from maskdiff.corruption.noising import MaskedPatchNoise
from maskdiff.methods.base import MaskDiffModule
from maskdiff.objectives.base import Objective
from maskdiff.objectives.diffusion import DiffusionLoss
from maskdiff.optim import mae_adamw
from maskdiff.samplers.base import Sampler
from maskdiff.samplers.ddpm import DDPMSampler


class DiffMAE(MaskDiffModule):
    """``None`` parts take DiffMAE's defaults: :class:`MaskedPatchNoise` (75% of the tokens; use 0.9 and ``tube`` for
    video), x0-prediction MSE on the hidden tokens only, a DDPM sampler (250 steps) for inpainting, MAE's AdamW (the
    recipe of DiffMAE is unverified) and no EMA; x̂0 is clipped to [-1, 1]. The backbone must denoise hidden tokens
    (``hidden_tokens == "noised"``: :class:`maskdiff.backbones.DiffMAE`). Unconditional: labels are ignored.
    ``generate`` works (every token hidden, the encoder sees only cls) but is not what DiffMAE is trained for;
    inpainting is. Other options: :class:`~maskdiff.methods.base.MaskDiffModule`.
    """

    default_inpainting = "hidden_chain"

    def __init__(
        self,
        backbone: Backbone,
        corruption: Corruption | None = None,
        objective: Objective | None = None,
        sampler: Sampler | None = None,
        optimizer: OptimizerCallable = mae_adamw,
        ema_decay: float | None = None,
        clip_x0: float | None = 1.0,
        **kwargs,
    ) -> None:
        super().__init__(
            backbone=backbone,
            corruption=corruption if corruption is not None else MaskedPatchNoise(0.75),
            objective=objective if objective is not None else DiffusionLoss(prediction="x0", learn_sigma=False, region="masked"),
            sampler=sampler if sampler is not None else DDPMSampler(),
            optimizer=optimizer,
            ema_decay=ema_decay,
            clip_x0=clip_x0,
            **kwargs,
        )
