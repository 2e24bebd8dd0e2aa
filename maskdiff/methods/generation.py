"""Generation: a method's backbone, noise schedule and parameterization as a :class:`Denoiser`, run by a sampler."""

from __future__ import annotations

import lightning as L
import torch

from maskdiff.autoencoders.base import Autoencoder
from maskdiff.backbones.base import Backbone
from maskdiff.corruption.base import Corruption
from maskdiff.methods.contracts import generation_gap
from maskdiff.modes import evaluating
from maskdiff.objectives.base import Objective
from maskdiff.samplers.base import Sampler, StepCallback
from maskdiff.samplers.ddpm import DDPMSampler
from maskdiff.samplers.denoiser import Denoiser
from maskdiff.samplers.guidance import ClassifierFreeGuidance


class Generation(L.LightningModule):
    """Mixin for methods: :meth:`denoiser` and :meth:`generate` from the declared parts (the corruption's schedule
    and time offset, the objective's parameterization); refuses, naming the part, when the method cannot generate."""

    backbone: Backbone
    corruption: Corruption
    objective: Objective
    autoencoder: Autoencoder
    sampler: Sampler | None
    guidance: ClassifierFreeGuidance | None
    clip_x0: float | None

    def check_can_generate(self) -> None:
        """ValueError naming the part when the method cannot generate (no noise schedule or no parameterization)."""
        gap = generation_gap(self.corruption, self.objective)
        if gap is not None:
            raise ValueError(f"{type(self).__name__} cannot generate: {gap}")

    def denoiser(self, use_ema: bool = True, guidance: ClassifierFreeGuidance | None = None) -> Denoiser:
        """The inference backbone (EMA when ``use_ema`` and there is one) as a :class:`Denoiser`, with ``guidance``
        or the method's own."""
        self.check_can_generate()
        parameterization = self.objective.parameterization
        return Denoiser(
            self.inference_backbone(use_ema),
            self.corruption.schedule,
            prediction=parameterization.target,
            learn_sigma=parameterization.learn_sigma,
            guidance=guidance if guidance is not None else self.guidance,
            clip_x0=self.clip_x0,
            prediction_part=parameterization.part,
            time_offset=self.corruption.model_time_offset,
        )

    def chosen_sampler(self, sampler: Sampler | None) -> Sampler:
        """``sampler``, else the method's configured one, else DDPM with the full schedule."""
        return sampler or self.sampler or DDPMSampler()

    def sampling_steps(self, sampler: Sampler | None = None, steps: int | None = None) -> int:
        """How many sampling steps (``callback`` calls) :meth:`generate` runs with ``sampler`` and ``steps``: the
        chosen sampler's :meth:`~maskdiff.samplers.Sampler.num_steps` over the corruption's schedule."""
        self.check_can_generate()
        return self.chosen_sampler(sampler).num_steps(self.corruption.schedule, steps)

    @torch.no_grad()
    def generate(
        self,
        labels: torch.Tensor | None = None,
        num: int | None = None,
        sampler: Sampler | None = None,
        guidance: ClassifierFreeGuidance | None = None,
        generator: torch.Generator | None = None,
        use_ema: bool = True,
        steps: int | None = None,
        callback: StepCallback | None = None,
    ) -> torch.Tensor:
        """Sample images ``(B, C, H, W)``: one per label of ``labels (B,)``, or ``num`` unconditional ones.
        ``callback(step, x, output)`` is called after every sampling step (progress bars, chain previews), as many
        times as :meth:`sampling_steps` says."""
        if labels is None and num is None:
            raise ValueError("pass labels (class-conditional) or num (unconditional)")
        batch = len(labels) if labels is not None else num
        denoiser = self.denoiser(use_ema, guidance)
        shape = (batch, self.patchifier.num_tokens, self.patchifier.values_per_patch)
        labels = labels.to(self.device) if labels is not None and self.conditional else None
        with evaluating(denoiser.backbone):
            tokens = self.chosen_sampler(sampler).sample(denoiser, shape, labels, generator=generator, callback=callback,
                                                         device=self.device, steps=steps)
        return self.autoencoder.decode(self.patchifier.unpatchify(tokens))
