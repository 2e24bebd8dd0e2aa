"""Classifier-free guidance: constant or MDT's power-cosine schedule, on all channels or the first k."""

from __future__ import annotations

import math
from typing import Literal

import torch


class ClassifierFreeGuidance:
    """``out = uncond + w_t · (cond - uncond)`` on the predicted (non-variance) part of the output.

    Args:
        scale: guidance scale ``s`` (1 = no guidance).
        channels: guide only the first ``channels`` image channels (the official DiT guides 3 of 4 latent
            channels, a reproducibility quirk); ``None`` guides all channels, the standard formulation.
        schedule: ``constant`` (``w_t = s``) or ``power_cosine`` (MDT:
            ``w_t = (s - 1)·(1 - cos(π·(1 - t/T)^power))/2 + 1``, ≈1 at t≈T and s at t=0).
        power: exponent of the power-cosine schedule (MDT's default 4).
    """

    def __init__(
        self,
        scale: float = 1.0,
        channels: int | None = None,
        schedule: Literal["constant", "power_cosine"] = "constant",
        power: float = 4.0,
    ) -> None:
        if schedule not in ("constant", "power_cosine"):
            raise ValueError(f"unknown guidance schedule {schedule!r}; expected 'constant' or 'power_cosine'")
        self.scale = scale
        self.channels = channels
        self.schedule = schedule
        self.power = power

    @property
    def active(self) -> bool:
        return self.scale != 1.0

    def weight(self, t: torch.Tensor, num_steps: int) -> torch.Tensor:
        """Guidance weight per sample ``(B,)`` at original timesteps ``t (B,)``."""
        if self.schedule == "constant":
            return torch.full(t.shape, float(self.scale), device=t.device)
        ramp = (1 - torch.cos(((1 - t.double() / num_steps) ** self.power) * math.pi)) / 2
        return ((self.scale - 1) * ramp + 1).float()

    def combine(self, cond: torch.Tensor, uncond: torch.Tensor, weight: torch.Tensor, channels: int) -> torch.Tensor:
        """Guide ``cond, uncond (B, N, P)`` (P = pixels_per_patch · ``channels``) with ``weight (B,)``."""
        guided = uncond + weight.view(-1, 1, 1).to(cond.dtype) * (cond - uncond)
        if self.channels is None or self.channels >= channels:
            return guided
        keep = torch.zeros(channels, dtype=torch.bool, device=cond.device)
        keep[: self.channels] = True
        guided = guided.unflatten(-1, (-1, channels))
        return torch.where(keep, guided, cond.unflatten(-1, (-1, channels))).flatten(-2)
