"""MAE: hide 75% of the patch tokens, encode the rest, predict the hidden pixels; MSE on hidden patches only."""

from __future__ import annotations

import torch
from lightning.pytorch.cli import OptimizerCallable

from maskdiff.backbones.base import Backbone
from maskdiff.corruption.base import Corruption
from maskdiff.corruption.maskers import Masker
from maskdiff.corruption.noising import TokenMasking
from maskdiff.methods.base import MaskDiffModule
from maskdiff.modes import evaluating
from maskdiff.objectives.base import Objective
from maskdiff.objectives.reconstruction import MaskedReconstruction
from maskdiff.optim import mae_adamw


class MAE(MaskDiffModule):
    """He et al.'s recipe; every part can be replaced from YAML. ``None`` parts take MAE's defaults:
    ``TokenMasking(0.75)`` and pixel MSE on the hidden patches (``norm_pix=False``, the official flag's default;
    the paper's best setting and the released checkpoints use ``norm_pix: true``), AdamW (betas 0.9/0.95, weight
    decay 0.05, base lr 1.5e-4) and no EMA. Not generative: it inpaints by reconstruction (one pass).
    Other options: :class:`~maskdiff.methods.base.MaskDiffModule`."""

    default_inpainting = "reconstruct"

    def __init__(
        self,
        backbone: Backbone,
        corruption: Corruption | None = None,
        objective: Objective | None = None,
        optimizer: OptimizerCallable = mae_adamw,
        ema_decay: float | None = None,
        **kwargs,
    ) -> None:
        super().__init__(
            backbone=backbone,
            corruption=corruption if corruption is not None else TokenMasking(0.75),
            objective=objective if objective is not None else MaskedReconstruction(norm_pix=False, region="masked"),
            optimizer=optimizer,
            ema_decay=ema_decay,
            **kwargs,
        )

    @torch.no_grad()
    def reconstruct(
        self,
        images: torch.Tensor,
        mask_ratio: float | None = None,
        generator: torch.Generator | None = None,
        use_ema: bool = True,
        masker: Masker | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Hide ``mask_ratio`` of each image's patches and fill them with the model's prediction.

        ``images (B, C, H, W)`` -> ``(reconstruction (B, C, H, W), mask (B, N) bool, True = hidden)``. Visible patches
        are pasted back unchanged. ``mask_ratio`` and ``masker`` default to the corruption's; ``generator`` (CPU) seeds
        the masks. A norm-pix model predicts standardised patches: they are mapped back with each hidden patch's own
        mean and std (MAE's visualisation convention, which reveals those two numbers per patch).
        """
        ratio = self.corruption.mask_ratio if mask_ratio is None else mask_ratio
        masker = masker if masker is not None else self.corruption.masker
        tokens = self.to_tokens(images.to(self.device))
        masking = masker.mask(tokens.shape[0], self.patchifier.grid, ratio, device=tokens.device, generator=generator)
        with evaluating(self.inference_backbone(use_ema)) as backbone:
            prediction = backbone(tokens, masking=masking).to(tokens.dtype)
        if self.objective.norm_pix:
            mean, var = tokens.mean(dim=-1, keepdim=True), tokens.var(dim=-1, keepdim=True)
            prediction = prediction * (var + 1e-6).sqrt() + mean
        filled = torch.where(masking.mask.unsqueeze(-1), prediction, tokens)
        return self.autoencoder.decode(self.patchifier.unpatchify(filled)), masking.mask
