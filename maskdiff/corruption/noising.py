"""Corruptions of the diffusion family: Gaussian noise at a uniformly drawn timestep, optionally masked."""

from __future__ import annotations

import math

import torch

from maskdiff.corruption.base import Corrupted, Corruption
from maskdiff.corruption.masking import random_masking, tube_masking
from maskdiff.diffusion.schedules import NoiseSchedule, ScheduleName


class GaussianNoise(Corruption):
    """DiT's corruption: ``t ~ U{0..T-1}``, ``x_t = sqrt(ᾱ_t) x0 + sqrt(1-ᾱ_t) ε`` on every token.

    Args:
        schedule: β schedule name (``linear``, ``cosine``, ``rho_linear``).
        num_steps: T.
        beta_start, beta_end, rho, cosine_s: schedule parameters (see :class:`NoiseSchedule`).
    """

    def __init__(
        self,
        schedule: ScheduleName = "linear",
        num_steps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        rho: float = 0.8,
        cosine_s: float = 0.008,
    ) -> None:
        super().__init__()
        self.schedule = NoiseSchedule(schedule, num_steps, beta_start, beta_end, rho, cosine_s)

    def noised(self, clean: torch.Tensor, t: torch.Tensor, name: str = "") -> Corrupted:
        """A view of ``clean (B, N, P)`` noised at ``t (B,)`` with fresh noise."""
        noise = torch.randn_like(clean)
        return Corrupted(
            tokens=self.schedule.q_sample(clean, t, noise),
            clean=clean,
            t=t,
            model_t=t.to(clean.dtype),
            noise=noise,
            schedule=self.schedule,
            name=name,
        )

    def sample_t(self, batch: int, device) -> torch.Tensor:
        return torch.randint(0, self.schedule.num_steps, (batch,), device=device)

    def forward(self, clean: torch.Tensor, grid: tuple[int, ...]) -> list[Corrupted]:
        return [self.noised(clean, self.sample_t(clean.shape[0], clean.device))]


class TokenMasking(Corruption):
    """MAE's corruption: hide a fixed share of tokens per sample (random; ``tube`` for video), no noise.

    Args:
        mask_ratio: share of tokens hidden from the encoder.
        tube: mask the same spatial cells in every frame (video grids ``(t, h, w)``).
    """

    def __init__(self, mask_ratio: float = 0.75, tube: bool = False) -> None:
        super().__init__()
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio {mask_ratio} is outside [0, 1)")
        self.mask_ratio = mask_ratio
        self.tube = tube
        self.schedule = None

    def mask(self, batch: int, grid: tuple[int, ...], device):
        if self.tube:
            if len(grid) != 3:
                raise ValueError(f"tube masking needs a video token grid (t, h, w), got {grid}")
            return tube_masking(batch, grid, self.mask_ratio, device=device)
        return random_masking(batch, math.prod(grid), self.mask_ratio, device=device)

    def forward(self, clean: torch.Tensor, grid: tuple[int, ...]) -> list[Corrupted]:
        return [Corrupted(tokens=clean, clean=clean, masking=self.mask(clean.shape[0], grid, clean.device))]


class MaskedNoise(GaussianNoise):
    """MDT's corruption: two views of the batch at the same ``t`` with independent noise, a full pass and a
    masked pass whose encoder sees only the kept noisy tokens.

    Args:
        mask_ratio: share of tokens hidden in the masked pass (MDT: 0.3).
        max_mask_ratio: draw one ratio per batch from ``U[mask_ratio, max_mask_ratio]`` (MDTv2: 0.3 to 0.5);
            ``None`` keeps it fixed (MDTv1; also keeps compiled shapes static).
        full_pass: also return the unmasked view (MDT trains on both; ``False`` gives a masked-only ablation).
        schedule, num_steps, beta_start, beta_end, rho, cosine_s: as :class:`GaussianNoise`.
    """

    def __init__(
        self,
        mask_ratio: float = 0.3,
        max_mask_ratio: float | None = None,
        full_pass: bool = True,
        schedule: ScheduleName = "linear",
        num_steps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        rho: float = 0.8,
        cosine_s: float = 0.008,
    ) -> None:
        super().__init__(schedule, num_steps, beta_start, beta_end, rho, cosine_s)
        top = mask_ratio if max_mask_ratio is None else max_mask_ratio
        if not 0.0 < mask_ratio <= top < 1.0:
            raise ValueError(
                f"mask ratios must satisfy 0 < mask_ratio <= max_mask_ratio < 1, got {mask_ratio} and {max_mask_ratio}"
            )
        self.mask_ratio = mask_ratio
        self.max_mask_ratio = max_mask_ratio
        self.full_pass = full_pass

    def draw_ratio(self) -> float:
        if self.max_mask_ratio is None:
            return self.mask_ratio
        return self.mask_ratio + float(torch.rand(())) * (self.max_mask_ratio - self.mask_ratio)

    def forward(self, clean: torch.Tensor, grid: tuple[int, ...]) -> list[Corrupted]:
        t = self.sample_t(clean.shape[0], clean.device)
        masked = self.noised(clean, t, name="masked")
        masked.masking = random_masking(clean.shape[0], math.prod(grid), self.draw_ratio(), device=clean.device)
        return [self.noised(clean, t, name="full"), masked] if self.full_pass else [masked]
