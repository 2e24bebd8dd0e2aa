"""Ancestral DDPM sampling over a respaced schedule, with learned or fixed variance (ADM ``p_sample``)."""

from __future__ import annotations

from typing import Literal

import torch

from maskdiff.diffusion.schedules import NoiseSchedule
from maskdiff.samplers.base import Sampler
from maskdiff.samplers.denoiser import Denoiser, DenoiserOutput


class DDPMSampler(Sampler):
    """``x_{i-1} = μ̃(x̂0, x_i) + 1[i>0]·σ_i·z`` on the respaced chain.

    Args:
        steps: respaced steps (DiT: 250).
        fixed_variance: variance when the model does not learn it: ``large`` (β, ADM's default) or ``small`` (β̃).
    """

    name = "ddpm"

    def __init__(self, steps: int = 250, fixed_variance: Literal["large", "small"] = "large") -> None:
        super().__init__(steps)
        if fixed_variance not in ("large", "small"):
            raise ValueError(f"fixed_variance must be 'large' or 'small', got {fixed_variance!r}")
        self.fixed_variance = fixed_variance

    def log_variance(self, respaced: NoiseSchedule, index: torch.Tensor, output: DenoiserOutput, x: torch.Tensor) -> torch.Tensor:
        if output.variance is not None:
            return respaced.learned_log_variance(output.variance, index)
        if self.fixed_variance == "small":
            return respaced.gather(respaced.posterior_log_variance_clipped, index, x)
        large = torch.cat([respaced.posterior_variance[1:2], respaced.betas[1:]])
        return respaced.gather(torch.log(large), index, x)

    def step(self, denoiser: Denoiser, respaced: NoiseSchedule, i: int, x: torch.Tensor, y, generator):
        batch = x.shape[0]
        index = torch.full((batch,), i, dtype=torch.long, device=x.device)
        output = denoiser(x, respaced.timestep_map[i].expand(batch).to(x.device), y)
        mean, _ = respaced.q_posterior(output.x0, x, index)
        if i == 0:
            return mean, output
        log_variance = self.log_variance(respaced, index, output, x)
        return mean + torch.exp(0.5 * log_variance) * self.randn(x.shape, generator, like=x), output
