"""What a diffusion model predicts (ε, x0 or v) and conversions between the three.

With ``α = sqrt(ᾱ_t)``, ``σ = sqrt(1 - ᾱ_t)``: ``x_t = α x0 + σ ε`` and ``v = α ε - σ x0``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

Prediction = Literal["eps", "x0", "v"]


def to_x0(prediction: torch.Tensor, x_t: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor, kind: Prediction) -> torch.Tensor:
    """x̂0 from a model output of ``kind``."""
    if kind == "eps":
        return (x_t - sigma * prediction) / alpha
    if kind == "x0":
        return prediction
    if kind == "v":
        return alpha * x_t - sigma * prediction
    raise ValueError(f"unknown prediction {kind!r}; expected 'eps', 'x0' or 'v'")


def to_eps(prediction: torch.Tensor, x_t: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor, kind: Prediction) -> torch.Tensor:
    """ε̂ from a model output of ``kind``."""
    if kind == "eps":
        return prediction
    if kind == "x0":
        return (x_t - alpha * prediction) / sigma
    if kind == "v":
        return sigma * x_t + alpha * prediction
    raise ValueError(f"unknown prediction {kind!r}; expected 'eps', 'x0' or 'v'")


def to_v(x0: torch.Tensor, eps: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Velocity target ``v = α ε - σ x0``."""
    return alpha * eps - sigma * x0


def target_for(kind: Prediction, x0: torch.Tensor, eps: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The regression target of a model that predicts ``kind``."""
    if kind == "eps":
        return eps
    if kind == "x0":
        return x0
    if kind == "v":
        return to_v(x0, eps, alpha, sigma)
    raise ValueError(f"unknown prediction {kind!r}; expected 'eps', 'x0' or 'v'")


@dataclass(frozen=True)
class Parameterization:
    """How a generative objective's backbone output is read when sampling.

    Attributes:
        target: what the prediction part holds: ``eps``, ``x0`` or ``v``.
        learn_sigma: output part 1 holds the learned-variance interpolation values (DiT / ADM's hybrid loss).
        part: which output part holds the prediction (UMD's ``[x0 ‖ ε]`` sampled with ε: 1).
    """

    target: Prediction = "eps"
    learn_sigma: bool = False
    part: int = 0

    def __post_init__(self) -> None:
        if self.target not in ("eps", "x0", "v"):
            raise ValueError(f"unknown prediction target {self.target!r}; expected 'eps', 'x0' or 'v'")
        if self.learn_sigma and self.part != 0:
            raise ValueError("a learned variance lives in output part 1, so the prediction must be part 0")
