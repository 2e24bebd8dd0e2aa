"""The Sampler contract: one call shape for every sampler, with inpainting by ``known``/``mask``."""

from __future__ import annotations

from typing import Callable, ClassVar

import torch

from maskdiff.diffusion.schedules import NoiseSchedule, Spacing
from maskdiff.samplers.denoiser import Denoiser, DenoiserOutput

StepCallback = Callable[[int, torch.Tensor, DenoiserOutput], None]


class Sampler:
    """``sample(denoiser, shape, y, generator, known, mask, callback) -> (B, N, P)`` tokens.

    Deterministic given ``generator`` (noise is drawn on the CPU generator and moved, so a seed gives the same
    result on any device). ``known (B, N, P)`` with ``mask (B, N)`` (True = generate) turns any sampler into a
    RePaint-style inpainter: after every step the known tokens are replaced by ``known`` noised to that step.

    Args:
        steps: number of respaced steps (kept steps include 0 and T-1 for two or more; one step keeps only t = 0,
            so use :class:`maskdiff.samplers.FirstStepSampler` for a one-step x̂0 from pure noise).
        spacing: which timesteps are kept: ``adm`` (ADM/DiT's ``space_timesteps``) or ``big_vision`` (UMD's DDIM
            loop: ``T-1, T-1 - T//steps, ...``, then 0; ``steps + 1`` calls). See :meth:`NoiseSchedule.respace`.

    Attributes:
        name: the sampler's kind as the command line names it (``ddpm``, ``ddim``, ``first_step``).
    """

    name: ClassVar[str] = "custom"

    def __init__(self, steps: int = 250, spacing: Spacing = "adm") -> None:
        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        if spacing not in ("adm", "big_vision"):
            raise ValueError(f"spacing must be 'adm' or 'big_vision', got {spacing!r}")
        self.steps = steps
        self.spacing = spacing

    def num_steps(self, schedule: NoiseSchedule, steps: int | None = None) -> int:
        """How many reverse steps :meth:`sample` runs over ``schedule`` with ``steps`` respaced steps (default
        :attr:`steps`): one denoiser call and one ``callback`` each (``big_vision`` spacing: ``steps + 1``)."""
        return schedule.respace(steps or self.steps, self.spacing).num_steps

    @staticmethod
    def randn(shape, generator: torch.Generator | None, like: torch.Tensor | None = None, device=None) -> torch.Tensor:
        noise = torch.randn(shape, generator=generator, dtype=torch.float32)
        return noise.to(device=device if like is None else like.device)

    def step(self, denoiser: Denoiser, respaced: NoiseSchedule, i: int, x: torch.Tensor, y, generator) -> tuple[torch.Tensor, DenoiserOutput]:
        """One reverse step from respaced index ``i`` to ``i - 1``."""
        raise NotImplementedError

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
        respaced = denoiser.schedule.respace(steps or self.steps, self.spacing)
        x = self.randn(shape, generator, device=device)
        keep = None if mask is None else (~mask.bool()).unsqueeze(-1).to(x.device)
        for i in reversed(range(respaced.num_steps)):
            x, output = self.step(denoiser, respaced, i, x, y, generator)
            if keep is not None:
                if i > 0:
                    t_prev = respaced.timestep_map[i - 1].expand(shape[0]).to(x.device)
                    known_noisy = denoiser.schedule.q_sample(known, t_prev, self.randn(shape, generator, like=x))
                else:
                    known_noisy = known
                x = torch.where(keep, known_noisy.to(x.dtype), x)
            if callback is not None:
                callback(i, x, output)
        return x
