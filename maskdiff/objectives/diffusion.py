"""Denoising objectives: ε / x0 / v regression, DiT's hybrid loss with learned variance, Min-SNR-γ weighting."""

from __future__ import annotations

from typing import Literal

import torch

from maskdiff.corruption.base import Corrupted
from maskdiff.diffusion.parameterization import Parameterization, Prediction, target_for
from maskdiff.objectives.base import Objective, ObjectiveOutput, Region, region_mean
from maskdiff.objectives.vlb import vlb_terms

Weighting = Literal["uniform", "min_snr"]


def min_snr_weight(snr: torch.Tensor, gamma: float, prediction: Prediction) -> torch.Tensor:
    """Min-SNR-γ loss weight (Hang et al.) for a model predicting ``prediction``: ``(B,)``."""
    clipped = snr.clamp(max=gamma)
    if prediction == "eps":
        return clipped / snr
    if prediction == "x0":
        return clipped
    if prediction == "v":
        return clipped / (snr + 1)
    raise ValueError(f"unknown prediction {prediction!r}")


class DiffusionLoss(Objective):
    """Mean squared error to the ε, x0 or v target, plus the VLB term when the variance is learned.

    Args:
        prediction: what the backbone predicts (``eps`` for DiT/MDT, ``x0`` for DiffMAE, ``v``).
        learn_sigma: the backbone also outputs variance interpolation values; adds DiT's L_vlb (on a detached mean).
        vlb_weight: factor on L_vlb (1 in DiT; ADM's rescaled variant uses T/1000).
        weighting: ``uniform`` or ``min_snr`` (Min-SNR-γ on the MSE term, as MDTv2).
        min_snr_gamma: γ.
        region: tokens the loss covers: ``all``, ``masked`` or ``visible`` (needs a masking corruption).
    """

    def __init__(
        self,
        prediction: Prediction = "eps",
        learn_sigma: bool = True,
        vlb_weight: float = 1.0,
        weighting: Weighting = "uniform",
        min_snr_gamma: float = 5.0,
        region: Region = "all",
    ) -> None:
        super().__init__()
        if prediction not in ("eps", "x0", "v"):
            raise ValueError(f"unknown prediction {prediction!r}; expected 'eps', 'x0' or 'v'")
        if weighting not in ("uniform", "min_snr"):
            raise ValueError(f"unknown weighting {weighting!r}; expected 'uniform' or 'min_snr'")
        self.prediction = prediction
        self.learn_sigma = learn_sigma
        self.output_parts = 2 if learn_sigma else 1
        self.vlb_weight = vlb_weight
        self.weighting = weighting
        self.min_snr_gamma = min_snr_gamma
        self.region = region
        self.parameterization = Parameterization(prediction, learn_sigma)

    needs_noise = True

    def forward(self, prediction: torch.Tensor, view: Corrupted) -> ObjectiveOutput:
        if view.noise is None or view.t is None or view.schedule is None:
            raise ValueError("DiffusionLoss needs a noised view (t, noise and schedule); got a noise-free view")
        parts = self.split(prediction, view)
        mean_output = parts[0]
        alpha, sigma = view.schedule.alpha_sigma(view.t, view.clean)
        target = target_for(self.prediction, view.clean, view.noise, alpha, sigma)
        region = view.region_mask(self.region)
        mse = region_mean((mean_output.float() - target.float()) ** 2, region)
        per_sample = mse
        if self.weighting == "min_snr":
            per_sample = per_sample * min_snr_weight(view.schedule.snr(view.t), self.min_snr_gamma, self.prediction).to(mse)
        logged = {"mse": mse.mean().detach()}
        if self.learn_sigma:
            vlb = region_mean(
                vlb_terms(mean_output.detach().float(), parts[1].float(), view.clean.float(), view.tokens.float(),
                          view.t, view.schedule, self.prediction),
                region,
            )
            per_sample = per_sample + self.vlb_weight * vlb
            logged["vlb"] = vlb.mean().detach()
        return ObjectiveOutput(loss=per_sample.mean(), parts=logged)
