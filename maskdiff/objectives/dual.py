"""UMD's objective: a dual ``[x0 ‖ ε]`` prediction scored per view (noise-free: x0 on hidden tokens; noised:
½ ε on visible + ½ x0 on hidden tokens)."""

from __future__ import annotations

from typing import Literal

import torch

from maskdiff.corruption.base import Corrupted
from maskdiff.diffusion.parameterization import Parameterization
from maskdiff.objectives.base import Objective, ObjectiveOutput, region_mean


class DualPredictionLoss(Objective):
    """The loss of UMD's ``trainers/train_ae.py``, for a backbone that outputs ``[x0 ‖ ε]`` tokens.

    * Noise-free view: ``mean(x0_se · m) / mean(m)`` over the hidden tokens ``m`` (all tokens without a mask).
    * Noised view with a mask: ``eps_weight · mean(ε_se · (1-m)) / mean(1-m) + x0_weight · mean(x0_se · m) / mean(m)``
      (ε on the visible tokens, x0 on the hidden ones); without a mask both terms cover all tokens.

    Squared errors are per value of the token layout, i.e. per pixel (or latent) value as in the official code; the
    per-sample means over equally sized regions average to the official batch means. View weights (the batch split)
    come from the corruption.

    Args:
        eps_weight, x0_weight: weights of the two terms of the noised view (UMD: ½ and ½).
        sample_with: which head the sampler reads: ``eps`` (UMD's default ``eps_pred=True``) or ``x0`` (x̂0,
            converted to ε̂ by the sampler).
    """

    output_parts = 2
    needs_noise = True

    def __init__(self, eps_weight: float = 0.5, x0_weight: float = 0.5, sample_with: Literal["eps", "x0"] = "eps") -> None:
        super().__init__()
        if sample_with not in ("eps", "x0"):
            raise ValueError(f"sample_with {sample_with!r} is invalid; expected 'eps' or 'x0'")
        self.eps_weight = eps_weight
        self.x0_weight = x0_weight
        self.parameterization = Parameterization(sample_with, part=1 if sample_with == "eps" else 0)

    def forward(self, prediction: torch.Tensor, view: Corrupted) -> ObjectiveOutput:
        x0_hat, eps_hat = self.split(prediction, view)
        x0_error = (x0_hat.float() - view.clean.float()) ** 2
        masked = view.masking is not None
        x0_loss = region_mean(x0_error, view.region_mask("masked") if masked else None).mean()
        if view.noise_free:
            return ObjectiveOutput(loss=x0_loss, parts={"x0_mse": x0_loss.detach()})
        eps_error = (eps_hat.float() - view.noise.float()) ** 2
        eps_loss = region_mean(eps_error, view.region_mask("visible") if masked else None).mean()
        loss = self.eps_weight * eps_loss + self.x0_weight * x0_loss
        return ObjectiveOutput(loss=loss, parts={"x0_mse": x0_loss.detach(), "eps_mse": eps_loss.detach()})
