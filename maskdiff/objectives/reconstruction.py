"""MAE's objective: pixel MSE on the hidden patches, optionally against per-patch normalised targets."""

from __future__ import annotations

import torch

from maskdiff.corruption.base import Corrupted
from maskdiff.objectives.base import Objective, ObjectiveOutput, Region, region_mean


def normalize_patches(tokens: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """MAE's norm-pix target: each token ``(B, N, P)`` standardised by its own mean and unbiased variance."""
    mean = tokens.mean(dim=-1, keepdim=True)
    var = tokens.var(dim=-1, keepdim=True)
    return (tokens - mean) / (var + eps).sqrt()


class MaskedReconstruction(Objective):
    """``mean((pred - target)^2)`` per token, averaged over ``region`` (``masked`` in MAE).

    Args:
        norm_pix: standardise each target patch (MAE's ``--norm_pix_loss``).
        region: ``masked`` (MAE), ``visible`` or ``all``.
    """

    def __init__(self, norm_pix: bool = False, region: Region = "masked") -> None:
        super().__init__()
        self.norm_pix = norm_pix
        self.region = region

    def forward(self, prediction: torch.Tensor, view: Corrupted) -> ObjectiveOutput:
        (reconstruction,) = self.split(prediction, view)
        target = normalize_patches(view.clean) if self.norm_pix else view.clean
        loss = region_mean((reconstruction.float() - target.float()) ** 2, view.region_mask(self.region)).mean()
        return ObjectiveOutput(loss=loss, parts={"mse": loss.detach()})
