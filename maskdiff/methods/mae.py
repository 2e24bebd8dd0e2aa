"""MAE: hide 75% of the patch tokens, encode the rest, predict the hidden pixels; MSE on hidden patches only."""

from __future__ import annotations

from typing import Any

import math

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from maskdiff.autoencoders.base import Autoencoder
from maskdiff.backbones.base import Backbone
from maskdiff.corruption.base import Corruption
from maskdiff.corruption.masking import masking_from_noise, random_masking
from maskdiff.corruption.noising import TokenMasking
from maskdiff.methods.base import MaskDiffModule
from maskdiff.methods.guards import NonFiniteAction
from maskdiff.objectives.base import Objective
from maskdiff.objectives.reconstruction import MaskedReconstruction
from maskdiff.samplers.base import Sampler
from maskdiff.samplers.guidance import ClassifierFreeGuidance


def mae_optimizer(params) -> torch.optim.Optimizer:
    """MAE's AdamW: betas (0.9, 0.95), weight decay 0.05, lr = the base lr 1.5e-4 (scale it by batch / 256)."""
    return torch.optim.AdamW(params, lr=1.5e-4, betas=(0.9, 0.95), weight_decay=0.05)


class MAE(MaskDiffModule):
    """He et al.'s recipe; every part can be replaced from YAML. ``None`` parts take MAE's defaults:
    ``TokenMasking(0.75)`` and pixel MSE on the hidden patches (``norm_pix=False``, the official flag's default;
    the paper's best setting and the released checkpoints use ``norm_pix: true``). Not generative: no sampler."""

    def __init__(
        self,
        backbone: Backbone,
        corruption: Corruption | None = None,
        objective: Objective | None = None,
        autoencoder: Autoencoder | None = None,
        optimizer: OptimizerCallable = mae_optimizer,
        lr_scheduler: LRSchedulerCallable | None = None,
        ema_decay: float | None = None,
        on_nonfinite: NonFiniteAction = "stop",
        max_skipped_steps: int = 20,
        compile_backbone: bool = False,
        compile_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(
            backbone=backbone,
            corruption=corruption if corruption is not None else TokenMasking(0.75),
            objective=objective if objective is not None else MaskedReconstruction(norm_pix=False, region="masked"),
            autoencoder=autoencoder,
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            ema_decay=ema_decay,
            on_nonfinite=on_nonfinite,
            max_skipped_steps=max_skipped_steps,
            compile_backbone=compile_backbone,
            compile_kwargs=compile_kwargs,
        )

    @torch.no_grad()
    def reconstruct(
        self,
        images: torch.Tensor,
        mask_ratio: float | None = None,
        generator: torch.Generator | None = None,
        use_ema: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Hide a random ``mask_ratio`` of each image's patches and fill them with the model's prediction.

        ``images (B, C, H, W)`` -> ``(reconstruction (B, C, H, W), mask (B, N) bool, True = hidden)``. Visible patches
        are pasted back unchanged. ``mask_ratio`` defaults to the corruption's; ``generator`` (CPU) seeds the masks.
        A norm-pix model predicts standardised patches: they are mapped back with each hidden patch's own mean and
        std (MAE's visualisation convention, which reveals those two numbers per patch).
        """
        ratio = getattr(self.corruption, "mask_ratio", 0.75) if mask_ratio is None else mask_ratio
        tokens = self.to_tokens(images.to(self.device))
        masking = random_masking(tokens.shape[0], math.prod(self.patchifier.grid), ratio, device=tokens.device, generator=generator)
        backbone = self.inference_backbone(use_ema)
        was_training = backbone.training
        backbone.eval()
        prediction = backbone(tokens, masking=masking).to(tokens.dtype)
        backbone.train(was_training)
        if getattr(self.objective, "norm_pix", False):
            mean, var = tokens.mean(dim=-1, keepdim=True), tokens.var(dim=-1, keepdim=True)
            prediction = prediction * (var + 1e-6).sqrt() + mean
        filled = torch.where(masking.mask.unsqueeze(-1), prediction, tokens)
        return self.autoencoder.decode(self.patchifier.unpatchify(filled)), masking.mask

    @torch.no_grad()
    def inpaint(
        self,
        images: torch.Tensor,
        pixel_mask: torch.Tensor,
        labels: torch.Tensor | None = None,
        sampler: Sampler | None = None,
        guidance: ClassifierFreeGuidance | None = None,
        generator: torch.Generator | None = None,
        use_ema: bool = True,
        steps: int | None = None,
    ) -> torch.Tensor:
        """One-step inpainting: the encoder sees the tokens with no masked pixel, the decoder fills the rest.

        ``images (B, C, H, W)`` in [-1, 1], ``pixel_mask (B, 1, H, W)`` or ``(B, H, W)`` bool (True = generate) ->
        ``(B, C, H, W)`` with the known pixels kept exactly. There is no sampler: ``labels``, ``sampler``,
        ``guidance``, ``generator`` and ``steps`` are accepted for the common signature and ignored. A norm-pix
        model's standardised predictions are mapped back with the mean and variance of the image's visible
        patches, since the hidden patches' own statistics are unknown when inpainting.
        """
        images = images.to(self.device)
        pixel_mask, hidden = self.inpainting_masks(images, pixel_mask)
        tokens = self.to_tokens(images)
        counts = hidden.sum(1)
        rows = [slice(None)] if bool((counts == counts[0]).all()) else [slice(i, i + 1) for i in range(len(hidden))]
        backbone = self.inference_backbone(use_ema)
        was_training = backbone.training
        backbone.eval()
        try:
            prediction = torch.cat([
                backbone(tokens[row], masking=masking_from_noise(hidden[row].float(), int((~hidden[row][0]).sum())))
                for row in rows
            ]).to(tokens.dtype)
        finally:
            backbone.train(was_training)
        if getattr(self.objective, "norm_pix", False):
            visible = (~hidden).unsqueeze(-1).to(tokens.dtype)
            count = visible.sum(1, keepdim=True).clamp_min(1)
            mean = (tokens.mean(-1, keepdim=True) * visible).sum(1, keepdim=True) / count
            var = (tokens.var(-1, keepdim=True) * visible).sum(1, keepdim=True) / count
            prediction = prediction * (var + 1e-6).sqrt() + mean
        filled = torch.where(hidden.unsqueeze(-1), prediction, tokens)
        generated = self.autoencoder.decode(self.patchifier.unpatchify(filled)).to(images.dtype)
        return torch.where(pixel_mask, generated, images)
