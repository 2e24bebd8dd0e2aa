"""MAE as a diffusion model's first reverse step: one denoiser call at t = T - 1 on pure noise, returning its x̂0.

DiffMAE's x̂0 from pure noise estimates E[x0 | visible tokens], the blurry reconstruction MAE regresses to
(Wei et al., 2023, §4.3). A respaced DDPM/DDIM chain of one step cannot show it: ADM's
respacing keeps t = 0 when a single step is asked for.
"""

from __future__ import annotations

import torch

from maskdiff.diffusion.schedules import NoiseSchedule
from maskdiff.samplers.base import Sampler, StepCallback
from maskdiff.samplers.denoiser import Denoiser


class FirstStepSampler(Sampler):
    """``sample(...) -> (B, N, P)``: the denoiser's x̂0 at the last timestep T - 1 from N(0, I) noise, in one call.

    With ``known``/``mask`` the known tokens are returned as given.
    """

    name = "first_step"

    def __init__(self) -> None:
        super().__init__(steps=1)

    def num_steps(self, schedule: NoiseSchedule, steps: int | None = None) -> int:
        """One denoiser call, whatever ``schedule`` and ``steps``."""
        return 1

    @torch.no_grad()
    def sample(
        self,
        denoiser: Denoiser,
        shape: tuple[int, ...],
        y: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        known: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        callback: StepCallback | None = None,
        device=None,
        steps: int | None = None,
    ) -> torch.Tensor:
        if (known is None) != (mask is None):
            raise ValueError("inpainting needs both known tokens and a mask (True = generate)")
        noise = self.randn(shape, generator, device=device)
        t = torch.full((shape[0],), denoiser.schedule.num_steps - 1, dtype=torch.long, device=noise.device)
        output = denoiser(noise, t, y)
        if callback is not None:
            callback(0, output.x0, output)
        if known is None:
            return output.x0
        return torch.where(mask.bool().unsqueeze(-1).to(noise.device), output.x0, known.to(output.x0.dtype))
