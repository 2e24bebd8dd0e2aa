"""The Objective contract: a backbone's prediction and the corrupted view it saw -> a loss."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from maskdiff.corruption.base import Corrupted
from maskdiff.diffusion.parameterization import Parameterization

Region = Literal["all", "masked", "visible"]


@dataclass
class ObjectiveOutput:
    """``loss``: scalar to minimise; ``parts``: named scalars to log (already detached or cheap to detach)."""

    loss: torch.Tensor
    parts: dict[str, torch.Tensor] = field(default_factory=dict)


def region_mean(values: torch.Tensor, region_weights: torch.Tensor | None) -> torch.Tensor:
    """Per-sample mean of ``values (B, N, P)`` over the tokens in the region ``(B, N)`` (None = all): ``(B,)``."""
    per_token = values.mean(dim=-1)
    if region_weights is None:
        return per_token.mean(dim=-1)
    return (per_token * region_weights).sum(dim=-1) / region_weights.sum(dim=-1).clamp_min(1)


class Objective(nn.Module):
    """``forward(prediction (B, N, P_out), view: Corrupted) -> ObjectiveOutput``.

    What an objective declares (methods check it against the other parts when they are built):

    Attributes:
        output_parts: how many token-layout blocks the backbone must output (2 for a learned variance or UMD's
            dual [x0 ‖ ε] head).
        parameterization: how the backbone's output is read when sampling (target ε / x0 / v, learned variance,
            which output part); ``None`` for objectives that are not generative (MAE's reconstruction). A method with
            a sampler needs one.
        needs_noise: the loss reads the view's timesteps, noise and schedule, so the corruption must add noise.
        region: the tokens the loss covers: ``all``, or ``masked`` / ``visible`` (the corruption must mask).
        norm_pix: the backbone predicts per-patch standardised pixels (MAE's norm-pix target), which
            reconstructions map back to pixels.
    """

    output_parts: int = 1
    parameterization: Parameterization | None = None
    needs_noise: bool = False
    region: Region = "all"
    norm_pix: bool = False

    def forward(self, prediction: torch.Tensor, view: Corrupted) -> ObjectiveOutput:
        raise NotImplementedError

    def split(self, prediction: torch.Tensor, view: Corrupted) -> list[torch.Tensor]:
        """Split ``(B, N, parts*P)`` into ``parts`` tensors of ``(B, N, P)``; a clear error on a width mismatch."""
        width = view.clean.shape[-1]
        if prediction.shape[-1] != width * self.output_parts:
            raise ValueError(
                f"{type(self).__name__} expects backbone outputs of width {self.output_parts} x {width}, "
                f"got {prediction.shape[-1]}"
            )
        return list(prediction.split(width, dim=-1))
