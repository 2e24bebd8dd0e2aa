"""Samplers: one call shape (``Sampler.sample``) for DDPM, DDIM and inpainting, over a :class:`Denoiser`."""

from maskdiff.samplers.base import Sampler
from maskdiff.samplers.ddim import DDIMSampler
from maskdiff.samplers.ddpm import DDPMSampler
from maskdiff.samplers.denoiser import Denoiser, DenoiserOutput
from maskdiff.samplers.first_step import FirstStepSampler
from maskdiff.samplers.guidance import ClassifierFreeGuidance

__all__ = ["ClassifierFreeGuidance", "DDIMSampler", "DDPMSampler", "Denoiser", "DenoiserOutput", "FirstStepSampler", "Sampler"]
