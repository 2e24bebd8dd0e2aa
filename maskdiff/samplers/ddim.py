"""DDIM sampling (Song et al.), η = 0 deterministic, η = 1 ≈ DDPM (UMD's default)."""

from __future__ import annotations

import torch

from maskdiff.diffusion.schedules import NoiseSchedule, Spacing
from maskdiff.samplers.base import Sampler
from maskdiff.samplers.denoiser import Denoiser


class DDIMSampler(Sampler):
    """``x_prev = sqrt(ᾱ_prev)·x̂0 + sqrt(1-ᾱ_prev-σ²)·ε̂ + σ·z``, ``σ = η·sqrt((1-ᾱ_prev)/(1-ᾱ))·sqrt(1-ᾱ/ᾱ_prev)``.

    With ``spacing="big_vision"`` it is UMD's official ``ddim_sample_loop``: ``steps`` moves ``T-1 → T-1 - T//steps
    → … → 0`` and a last call at t = 0 whose x̂0 is the sample.

    Args:
        steps: respaced steps.
        eta: η.
        spacing: ``adm`` (DiT/ADM respacing) or ``big_vision`` (UMD's grid); see :class:`Sampler`.
    """

    name = "ddim"

    def __init__(self, steps: int = 50, eta: float = 0.0, spacing: Spacing = "adm") -> None:
        super().__init__(steps, spacing)
        if eta < 0:
            raise ValueError(f"eta must be non-negative, got {eta}")
        self.eta = eta

    def step(self, denoiser: Denoiser, respaced: NoiseSchedule, i: int, x: torch.Tensor, y, generator):
        batch = x.shape[0]
        index = torch.full((batch,), i, dtype=torch.long, device=x.device)
        output = denoiser(x, respaced.timestep_map[i].expand(batch).to(x.device), y)
        abar = respaced.gather(respaced.alphas_cumprod, index, x)
        abar_prev = respaced.gather(respaced.alphas_cumprod_prev, index, x)
        sigma = self.eta * torch.sqrt((1 - abar_prev) / (1 - abar)) * torch.sqrt(1 - abar / abar_prev)
        x_prev = abar_prev.sqrt() * output.x0 + torch.sqrt((1 - abar_prev - sigma**2).clamp_min(0)) * output.eps
        if i > 0 and self.eta > 0:
            x_prev = x_prev + sigma * self.randn(x.shape, generator, like=x)
        return x_prev, output
