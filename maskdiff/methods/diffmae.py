"""DiffMAE: diffusion models as masked autoencoders (Wei et al., ICCV 2023), for images and video.

Hide most patch tokens, noise only the hidden ones, encode the clean visible ones, and train the decoder to predict
the hidden tokens' clean pixels (x0 MSE on the hidden tokens). Inpainting is native: the encoder runs once on the
known tokens and the reverse chain runs on the hidden tokens only (:meth:`DiffMAE.inpaint_tokens`).
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn

from maskdiff.autoencoders.base import Autoencoder
from maskdiff.backbones.base import Backbone
from maskdiff.backbones.diffmae import EncoderContext
from maskdiff.corruption.base import Corruption
from maskdiff.corruption.masking import gather_tokens, masking_from_noise
from maskdiff.corruption.noising import MaskedPatchNoise
from maskdiff.methods.base import MaskDiffModule
from maskdiff.methods.guards import NonFiniteAction
from maskdiff.objectives.base import Objective
from maskdiff.objectives.diffusion import DiffusionLoss
from maskdiff.samplers.base import Sampler
from maskdiff.samplers.ddpm import DDPMSampler
from maskdiff.samplers.denoiser import Denoiser
from maskdiff.samplers.guidance import ClassifierFreeGuidance


def diffmae_optimizer(params) -> torch.optim.Optimizer:
    """MAE-like AdamW (the recipe of DiffMAE is unverified): betas (0.9, 0.95), weight decay 0.05, lr 1.5e-4
    (scale it by batch / 256)."""
    return torch.optim.AdamW(params, lr=1.5e-4, betas=(0.9, 0.95), weight_decay=0.05)


class HiddenTokenDecoder(nn.Module):
    """The decoder of a DiffMAE backbone over a cached encoder context, as a network a :class:`Denoiser` can call.

    ``forward(noisy (B, M, P), t (B,), y=None) -> (B, M, P)`` x0 predictions of the hidden tokens; the encoder is not
    run again.
    """

    def __init__(self, backbone: Backbone, context: EncoderContext) -> None:
        super().__init__()
        self.backbone = backbone
        self.context = context
        self.patchifier = backbone.patchifier
        self.num_classes = 0
        self.output_parts = 1

    def forward(self, noisy: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return self.backbone.decode_hidden(self.context, noisy, t)


class DiffMAE(MaskDiffModule):
    """``None`` parts take DiffMAE's defaults: :class:`MaskedPatchNoise` (75% of the tokens; use 0.9 and ``tube`` for
    video), x0-prediction MSE on the hidden tokens only, and a DDPM sampler (250 steps) for inpainting.
    The backbone must be a :class:`maskdiff.backbones.DiffMAE` (it needs ``encode_context`` / ``decode_hidden``).
    Unconditional: labels are ignored. ``generate`` works (every token hidden, the encoder sees only cls) but is
    not what DiffMAE is trained for; :meth:`inpaint` is.
    """

    def __init__(
        self,
        backbone: Backbone,
        corruption: Corruption | None = None,
        objective: Objective | None = None,
        sampler: Sampler | None = None,
        autoencoder: Autoencoder | None = None,
        optimizer: OptimizerCallable = diffmae_optimizer,
        lr_scheduler: LRSchedulerCallable | None = None,
        ema_decay: float | None = None,
        clip_x0: float | None = 1.0,
        on_nonfinite: NonFiniteAction = "stop",
        max_skipped_steps: int = 20,
        compile_backbone: bool = False,
        compile_kwargs: dict[str, Any] | None = None,
    ) -> None:
        for method in ("encode_context", "decode_hidden"):
            if not callable(getattr(backbone, method, None)):
                raise ValueError(f"DiffMAE needs a backbone with {method}() (maskdiff.backbones.DiffMAE), got {type(backbone).__name__}")
        super().__init__(
            backbone=backbone,
            corruption=corruption if corruption is not None else MaskedPatchNoise(0.75),
            objective=objective if objective is not None else DiffusionLoss(prediction="x0", learn_sigma=False, region="masked"),
            sampler=sampler if sampler is not None else DDPMSampler(),
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

    @torch.no_grad()
    def inpaint_tokens(
        self,
        tokens: torch.Tensor,
        hidden: torch.Tensor,
        sampler: Sampler | None = None,
        generator: torch.Generator | None = None,
        use_ema: bool = True,
        steps: int | None = None,
    ) -> torch.Tensor:
        """Generate the ``hidden (B, N)`` (True = generate) tokens of ``tokens (B, N, P)``; images or video.

        Per group of rows with the same number of hidden tokens, the encoder runs once on the known tokens and the
        sampler's reverse chain runs on the hidden tokens only, starting from N(0, I). Known tokens are returned
        exactly. ``(B, N, P)``.
        """
        tokens = tokens.to(self.device)
        hidden = hidden.to(self.device).bool()
        if hidden.shape != tokens.shape[:2]:
            raise ValueError(f"token mask of shape {tuple(hidden.shape)} does not fit tokens of shape {tuple(tokens.shape)}")
        sampler = sampler or self.sampler or DDPMSampler()
        backbone = self.inference_backbone(use_ema)
        counts = hidden.sum(1)
        filled = tokens.clone()
        was_training = backbone.training
        backbone.eval()
        try:
            for count in counts.unique().tolist():
                if count == 0:
                    continue
                rows = (counts == count).nonzero().squeeze(1)
                masking = masking_from_noise(hidden[rows].float(), tokens.shape[1] - count)
                context = backbone.encode_context(tokens[rows], masking)
                denoiser = Denoiser(HiddenTokenDecoder(backbone, context), self.corruption.schedule,
                                    prediction=self.objective.prediction, clip_x0=self.clip_x0)
                shape = (len(rows), count, tokens.shape[-1])
                generated = sampler.sample(denoiser, shape, None, generator=generator, device=self.device, steps=steps)
                known = gather_tokens(tokens[rows], masking.ids_keep)
                filled[rows] = gather_tokens(torch.cat([known, generated.to(tokens.dtype)], dim=1), masking.ids_restore)
        finally:
            backbone.train(was_training)
        return filled

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
        """Native DiffMAE inpainting of ``images (B, C, H, W)`` in [-1, 1]; ``pixel_mask (B, 1, H, W)`` or
        ``(B, H, W)`` bool, True = generate. A token is generated if any of its pixels is; known pixels are returned
        exactly. ``labels`` and ``guidance`` are ignored (unconditional). Video: use :meth:`inpaint_tokens`."""
        if self.patchifier.frames is not None:
            raise ValueError("inpaint takes images with a 2-D pixel mask; for video clips use inpaint_tokens with a token mask")
        images = images.to(self.device)
        pixel_mask, hidden = self.inpainting_masks(images, pixel_mask)
        tokens = self.inpaint_tokens(self.to_tokens(images), hidden, sampler, generator, use_ema, steps)
        generated = self.autoencoder.decode(self.patchifier.unpatchify(tokens)).to(images.dtype)
        return torch.where(pixel_mask, generated, images)
