"""The Denoiser: a backbone + its schedule + what it predicts, returning ε̂ and x̂0 for any sampler."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from maskdiff.backbones.base import Backbone
from maskdiff.diffusion.parameterization import Prediction, to_eps, to_x0
from maskdiff.diffusion.schedules import NoiseSchedule
from maskdiff.samplers.guidance import ClassifierFreeGuidance


@dataclass
class DenoiserOutput:
    """``eps``, ``x0``: ``(B, N, P)``; ``variance``: ``(B, N, P)`` learned-range values in [-1, 1] or ``None``."""

    eps: torch.Tensor
    x0: torch.Tensor
    variance: torch.Tensor | None = None


class Denoiser(nn.Module):
    """Wraps a backbone so that samplers see one interface whatever the parameterization.

    Args:
        backbone: a :class:`Backbone` whose output is ``[prediction ‖ variance?]`` in token layout.
        schedule: the (full, un-respaced) training schedule.
        prediction: ``eps``, ``x0`` or ``v``.
        learn_sigma: the second output part holds the variance interpolation.
        guidance: classifier-free guidance, applied when labels are given and its scale is not 1.
        clip_x0: clamp x̂0 to ``[-clip_x0, clip_x0]`` (pixels: 1.0; latents: None), re-deriving ε̂.
        prediction_part: which output part holds the prediction (UMD's ``[x0 ‖ ε]``: 1 for ε, 0 for x0).
        time_offset: added to the timestep the backbone is conditioned on (UMD: 1, its timestep 0 means "clean").
    """

    def __init__(
        self,
        backbone: Backbone,
        schedule: NoiseSchedule,
        prediction: Prediction = "eps",
        learn_sigma: bool = False,
        guidance: ClassifierFreeGuidance | None = None,
        clip_x0: float | None = None,
        prediction_part: int = 0,
        time_offset: float = 0.0,
    ) -> None:
        super().__init__()
        if prediction_part and learn_sigma:
            raise ValueError("a learned variance lives in output part 1, so the prediction must be part 0")
        self.backbone = backbone
        self.schedule = schedule
        self.prediction = prediction
        self.learn_sigma = learn_sigma
        self.guidance = guidance
        self.clip_x0 = clip_x0
        self.prediction_part = prediction_part
        self.time_offset = time_offset

    @property
    def num_steps(self) -> int:
        return self.schedule.num_steps

    def raw(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """Backbone output ``(B, N, parts*P)``, with classifier-free guidance applied to the prediction part."""
        guidance = self.guidance
        model_t = t.to(x_t.dtype) + self.time_offset
        if guidance is None or not guidance.active or y is None:
            return self.backbone(x_t, model_t, y)
        if self.backbone.num_classes <= 0:
            raise ValueError("classifier-free guidance needs a class-conditional backbone (num_classes > 0)")
        null = torch.full_like(y, self.backbone.num_classes)
        both = self.backbone(torch.cat([x_t, x_t]), torch.cat([model_t, model_t]), torch.cat([y, null]))
        cond, uncond = both.chunk(2)
        width = x_t.shape[-1]
        part = slice(self.prediction_part * width, (self.prediction_part + 1) * width)
        weight = guidance.weight(t, self.num_steps)
        guided = guidance.combine(cond[..., part], uncond[..., part], weight, self.backbone.patchifier.channels)
        output = cond.clone()
        output[..., part] = guided
        return output

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> DenoiserOutput:
        """``x_t (B, N, P)`` at original timesteps ``t (B,)`` long -> ε̂, x̂0 (and variance values)."""
        output = self.raw(x_t, t, y)
        width = x_t.shape[-1]
        prediction = output[..., self.prediction_part * width : (self.prediction_part + 1) * width]
        variance = output[..., width : 2 * width] if self.learn_sigma else None
        alpha, sigma = self.schedule.alpha_sigma(t, x_t)
        x0 = to_x0(prediction, x_t, alpha, sigma, self.prediction)
        if self.clip_x0 is not None:
            x0 = x0.clamp(-self.clip_x0, self.clip_x0)
            eps = to_eps(x0, x_t, alpha, sigma, "x0")
        else:
            eps = to_eps(prediction, x_t, alpha, sigma, self.prediction)
        return DenoiserOutput(eps=eps, x0=x0, variance=variance)
