"""Inpainting, one mechanism for every method: fill the hidden tokens of an image or clip from the known ones.

The method's ``inpainting`` mode (declared per method, settable in YAML; checked against the parts when the method
is built, see :data:`~maskdiff.methods.contracts.InpaintingMode`) chooses how the hidden tokens are produced:

* ``repaint``: the sampler's reverse chain over all tokens, the known ones replaced after every step by the encoded
  image noised to that step (RePaint; suits models trained on full images: DiT, MDT, UMD);
* ``hidden_chain``: the encoder runs once on the known tokens and the reverse chain runs on the hidden tokens only
  (DiffMAE's native inpainting);
* ``reconstruct``: one pass, the backbone predicts the hidden tokens from the known ones (MAE).

Rows with the same number of hidden tokens share one masking (the last two modes need rectangular batches). Known
tokens, and in :meth:`Inpainting.inpaint` known pixels, come back exactly as given.
"""

from __future__ import annotations

import lightning as L
import torch
from torch import nn

from maskdiff.autoencoders.base import Autoencoder
from maskdiff.backbones.base import Backbone
from maskdiff.corruption.base import Corruption
from maskdiff.corruption.masking import Masking, gather_tokens, masking_from_noise
from maskdiff.corruption.pixel_masks import as_pixel_mask, token_mask
from maskdiff.methods.contracts import InpaintingMode, generation_gap
from maskdiff.modes import evaluating
from maskdiff.objectives.base import Objective
from maskdiff.samplers.base import Sampler, StepCallback
from maskdiff.samplers.denoiser import Denoiser
from maskdiff.samplers.guidance import ClassifierFreeGuidance


class HiddenTokenDecoder(nn.Module):
    """The decoder of a backbone with ``hidden_tokens == "noised"`` over a cached encoder context, as a network a
    :class:`Denoiser` can call: ``forward(noisy (B, M, P), t (B,), y=None) -> (B, M, P)`` predictions for the hidden
    tokens; the encoder is not run again."""

    num_classes = 0
    output_parts = 1

    def __init__(self, backbone: Backbone, context) -> None:
        super().__init__()
        self.backbone = backbone
        self.context = context
        self.patchifier = backbone.patchifier

    def forward(self, noisy: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return self.backbone.decode_hidden(self.context, noisy, t)


class Inpainting(L.LightningModule):
    """Mixin for methods: :meth:`inpaint` (images and pixel masks) and :meth:`inpaint_tokens` (tokens and token masks,
    images or video) in the method's ``inpainting`` mode."""

    backbone: Backbone
    corruption: Corruption
    objective: Objective
    autoencoder: Autoencoder
    inpainting: InpaintingMode | None
    clip_x0: float | None

    def inpainting_masks(self, images: torch.Tensor, pixel_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``pixel_mask`` checked against ``images (B, C, H, W)`` as bool ``(B, 1, H, W)``, and the token mask
        ``(B, N)`` it implies (a token is generated if any of its pixels is); True = generate."""
        pixel_mask = as_pixel_mask(pixel_mask, images)
        return pixel_mask, token_mask(pixel_mask, self.autoencoder.downsample * self.patchifier.patch_size)

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
        callback: StepCallback | None = None,
    ) -> torch.Tensor:
        """Fill the masked pixels of ``images (B, C, H, W)`` in [-1, 1]; returns ``(B, C, H, W)``.

        ``pixel_mask (B, 1, H, W)`` or ``(B, H, W)`` bool, True = generate (a batch of 1 is broadcast). A token is
        generated if any of its pixels is (the mask is max-pooled over autoencoder downsample × patch size). The known
        pixels are pasted back, so they come out exactly as given even where a latent autoencoder's round trip is
        lossy. ``callback(step, x, output)`` is called after every sampling step (see :meth:`inpaint_tokens`). Video
        clips: :meth:`inpaint_tokens` with a token mask.
        """
        if self.patchifier.frames is not None:
            raise ValueError("inpaint takes images with a 2-D pixel mask; for video clips use inpaint_tokens with a token mask")
        images = images.to(self.device)
        pixel_mask, hidden = self.inpainting_masks(images, pixel_mask)
        tokens = self.inpaint_tokens(self.to_tokens(images), hidden, labels, sampler, guidance, generator, use_ema, steps,
                                     callback)
        generated = self.autoencoder.decode(self.patchifier.unpatchify(tokens)).to(images.dtype)
        return torch.where(pixel_mask, generated, images)

    @torch.no_grad()
    def inpaint_tokens(
        self,
        tokens: torch.Tensor,
        hidden: torch.Tensor,
        labels: torch.Tensor | None = None,
        sampler: Sampler | None = None,
        guidance: ClassifierFreeGuidance | None = None,
        generator: torch.Generator | None = None,
        use_ema: bool = True,
        steps: int | None = None,
        callback: StepCallback | None = None,
    ) -> torch.Tensor:
        """Generate the ``hidden (B, N)`` (True = generate) tokens of ``tokens (B, N, P)``, images or video; known tokens
        are returned exactly. ``labels``/``guidance`` reach ``repaint`` only; ``sampler``/``steps`` (default: the
        method's sampler) are unused by ``reconstruct``. ``callback(step, x, output)`` is called after every sampling
        step, :meth:`inpainting_steps` times in all. Returns ``(B, N, P)``."""
        tokens = tokens.to(self.device)
        hidden = hidden.to(self.device).bool()
        if hidden.shape != tokens.shape[:2]:
            raise ValueError(f"token mask of shape {tuple(hidden.shape)} does not fit tokens of shape {tuple(tokens.shape)}")
        if self.inpainting is None:
            raise ValueError(f"{type(self).__name__} cannot inpaint: {generation_gap(self.corruption, self.objective)}")
        if self.inpainting == "repaint":
            denoiser = self.denoiser(use_ema, guidance)
            labels = labels.to(self.device) if labels is not None and self.conditional else None
            with evaluating(denoiser.backbone):
                return self.chosen_sampler(sampler).sample(denoiser, tuple(tokens.shape), labels, generator=generator,
                                                           known=tokens, mask=hidden, device=self.device, steps=steps,
                                                           callback=callback)
        backbone = self.inference_backbone(use_ema)
        counts = hidden.sum(1)
        filled = tokens.clone()
        with evaluating(backbone):
            for count in counts.unique().tolist():
                if count == 0:
                    continue
                rows = (counts == count).nonzero().squeeze(1)
                masking = masking_from_noise(hidden[rows].float(), tokens.shape[1] - count)
                if self.inpainting == "hidden_chain":
                    filled[rows] = self.chain_on_hidden(backbone, tokens[rows], masking, sampler, generator, steps,
                                                        callback)
                else:
                    filled[rows] = self.reconstruct_hidden(backbone, tokens[rows], masking)
        return filled

    def inpainting_steps(self, hidden: torch.Tensor, sampler: Sampler | None = None, steps: int | None = None) -> int:
        """How many sampling steps (``callback`` calls) :meth:`inpaint_tokens` runs for the token mask ``hidden (B, N)``:
        one chain for ``repaint``, one per distinct nonzero count of hidden tokens for ``hidden_chain`` (each of
        :meth:`sampling_steps`), none for ``reconstruct`` or a method that cannot inpaint."""
        if self.inpainting == "repaint":
            return self.sampling_steps(sampler, steps)
        if self.inpainting == "hidden_chain":
            counts = hidden.bool().sum(1).unique()
            return int((counts > 0).sum()) * self.sampling_steps(sampler, steps)
        return 0

    def chain_on_hidden(self, backbone: Backbone, tokens: torch.Tensor, masking: Masking, sampler: Sampler | None,
                        generator: torch.Generator | None, steps: int | None,
                        callback: StepCallback | None = None) -> torch.Tensor:
        """``hidden_chain``: encode the tokens ``masking`` keeps once, sample the hidden ones from N(0, I) with the
        decoder alone; ``(B, N, P)``."""
        context = backbone.encode_context(tokens, masking)
        parameterization = self.objective.parameterization
        denoiser = Denoiser(HiddenTokenDecoder(backbone, context), self.corruption.schedule,
                            prediction=parameterization.target, clip_x0=self.clip_x0)
        shape = (tokens.shape[0], tokens.shape[1] - masking.num_keep, tokens.shape[-1])
        generated = self.chosen_sampler(sampler).sample(denoiser, shape, None, generator=generator, device=self.device,
                                                        steps=steps, callback=callback)
        known = gather_tokens(tokens, masking.ids_keep)
        return gather_tokens(torch.cat([known, generated.to(tokens.dtype)], dim=1), masking.ids_restore)

    def reconstruct_hidden(self, backbone: Backbone, tokens: torch.Tensor, masking: Masking) -> torch.Tensor:
        """``reconstruct``: one pass predicting the hidden tokens; ``(B, N, P)``. A norm-pix model's standardised
        predictions are mapped back with the mean and variance of the visible patches (the hidden patches' own
        statistics are unknown when inpainting)."""
        prediction = backbone(tokens, masking=masking).to(tokens.dtype)
        if self.objective.norm_pix:
            visible = (~masking.mask).unsqueeze(-1).to(tokens.dtype)
            count = visible.sum(1, keepdim=True).clamp_min(1)
            mean = (tokens.mean(-1, keepdim=True) * visible).sum(1, keepdim=True) / count
            var = (tokens.var(-1, keepdim=True) * visible).sum(1, keepdim=True) / count
            prediction = prediction * (var + 1e-6).sqrt() + mean
        return torch.where(masking.mask.unsqueeze(-1), prediction, tokens)
