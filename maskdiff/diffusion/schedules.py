"""Discrete noise schedules (linear, cosine, ρ-modified linear) and the official respacing.

``x_t = sqrt(ᾱ_t) x0 + sqrt(1 - ᾱ_t) ε`` with ``t ∈ [0, T)``. All tables are computed in float64 (as the
official DiT/ADM code does) and cast to the input's dtype when read.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

ScheduleName = Literal["linear", "cosine", "rho_linear"]
Spacing = Literal["adm", "big_vision"]


def linear_betas(num_steps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """DDPM/DiT linear schedule, scaled by ``1000 / T`` so any T spans the same noise range."""
    scale = 1000 / num_steps
    return torch.linspace(scale * beta_start, scale * beta_end, num_steps, dtype=torch.float64)


def cosine_betas(num_steps: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal cosine schedule (DiT's ``squaredcos_cap_v2``): ``β_i = min(1 - ᾱ(t2)/ᾱ(t1), max_beta)``."""

    def alpha_bar(u: float) -> float:
        return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

    betas = [min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), max_beta) for i in range(num_steps)]
    return torch.tensor(betas, dtype=torch.float64)


def rho_linear_betas(num_steps: int, rho: float = 0.8, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """ρ-modified linear schedule (DiffMAE, unverified detail): ``β = linspace(β_start, β_end)^ρ``; ρ<1 adds noise faster."""
    return linear_betas(num_steps, beta_start, beta_end) ** rho


def space_timesteps(num_steps: int, spacing: int | str) -> list[int]:
    """Timesteps kept when respacing, exactly as ADM/DiT's ``respace.space_timesteps``.

    ``spacing`` is a count K (one section: ``round(i * (T-1)/(K-1))``, so 0 and T-1 are kept), a comma list of
    per-section counts, or ``"ddimK"`` (a fixed integer stride giving exactly K steps).
    """
    if isinstance(spacing, str) and spacing.startswith("ddim"):
        desired = int(spacing[len("ddim") :])
        for stride in range(1, num_steps):
            if len(range(0, num_steps, stride)) == desired:
                return list(range(0, num_steps, stride))
        raise ValueError(f"cannot create exactly {desired} steps with an integer stride from {num_steps} steps")
    counts = [int(c) for c in str(spacing).split(",")]
    size_per, extra = divmod(num_steps, len(counts))
    start, kept = 0, set()
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"cannot divide a section of {size} steps into {count}; expected at most {size} steps")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        position = 0.0
        for _ in range(count):
            kept.add(start + round(position))
            position += stride
        start += size
    return sorted(kept)


def big_vision_timesteps(num_steps: int, steps: int) -> list[int]:
    """Timesteps of big_vision's ``ddim_sample_loop`` (UMD), ascending: ``T-1 - k·(T // steps)`` for ``k < steps``,
    then 0 -- ``steps + 1`` model calls, the last one at t = 0 returning its x̂0.

    Equals the official grid whenever ``steps · (T // steps) >= T - 1`` (every divisor of T, e.g. 125 of 1000);
    otherwise the official loop stops at ``T-1 - steps·(T // steps)`` and its last call treats that as t = 0, where
    this grid steps to 0.
    """
    if not 1 <= steps <= num_steps:
        raise ValueError(f"big_vision spacing takes 1 to {num_steps} steps, got {steps}")
    stride = num_steps // steps
    return sorted({num_steps - 1 - k * stride for k in range(steps)} | {0})


class NoiseSchedule(nn.Module):
    """A discrete diffusion schedule; tables are non-persistent float64 buffers (rebuilt from the config).

    Args:
        schedule: ``linear`` (DiT/MDT), ``cosine`` (s=0.008; UMD pixels) or ``rho_linear`` (DiffMAE).
        num_steps: T.
        beta_start, beta_end: range of the linear schedules.
        rho: exponent of ``rho_linear``.
        cosine_s: offset of ``cosine``.
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
        if schedule == "linear":
            betas = linear_betas(num_steps, beta_start, beta_end)
        elif schedule == "cosine":
            betas = cosine_betas(num_steps, cosine_s)
        elif schedule == "rho_linear":
            betas = rho_linear_betas(num_steps, rho, beta_start, beta_end)
        else:
            raise ValueError(f"unknown noise schedule {schedule!r}; expected 'linear', 'cosine' or 'rho_linear'")
        self.schedule = schedule
        self.num_steps = num_steps
        self._set_tables(betas, torch.arange(num_steps))

    @classmethod
    def from_betas(cls, betas: torch.Tensor, timestep_map: torch.Tensor) -> "NoiseSchedule":
        schedule = cls.__new__(cls)
        nn.Module.__init__(schedule)
        schedule.schedule = "respaced"
        schedule.num_steps = len(betas)
        schedule._set_tables(betas.to(torch.float64), timestep_map)
        return schedule

    def _set_tables(self, betas: torch.Tensor, timestep_map: torch.Tensor) -> None:
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64, device=betas.device), alphas_cumprod[:-1]])
        posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        # β̃_0 = 0, so the log is clipped to β̃_1 at t=0 (ADM's posterior_log_variance_clipped).
        clipped = torch.cat([posterior_variance[1:2], posterior_variance[1:]]) if len(betas) > 1 else betas
        tables = {
            "betas": betas,
            "alphas_cumprod": alphas_cumprod,
            "alphas_cumprod_prev": alphas_cumprod_prev,
            "posterior_variance": posterior_variance,
            "posterior_log_variance_clipped": torch.log(clipped),
            "posterior_mean_coef1": betas * torch.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
            "posterior_mean_coef2": (1.0 - alphas_cumprod_prev) * torch.sqrt(1.0 - betas) / (1.0 - alphas_cumprod),
            "timestep_map": timestep_map.to(torch.long),
        }
        for name, value in tables.items():
            self.register_buffer(name, value, persistent=False)

    def extra_repr(self) -> str:
        return f"schedule={self.schedule!r}, num_steps={self.num_steps}"

    # ---------------------------------------------------------------- reading tables
    @staticmethod
    def gather(table: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``table[t]`` shaped to broadcast against ``like`` (``(B, 1, ..., 1)``) in ``like``'s dtype."""
        values = table.to(t.device)[t].to(like.dtype)
        return values.view(-1, *([1] * (like.ndim - 1)))

    def alpha_sigma(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(sqrt(ᾱ_t), sqrt(1 - ᾱ_t))`` broadcastable to ``like``."""
        abar = self.gather(self.alphas_cumprod, t, like)
        return abar.sqrt(), (1 - abar).sqrt()

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """Signal-to-noise ratio ``ᾱ_t / (1 - ᾱ_t)`` per sample ``(B,)`` in float64."""
        abar = self.alphas_cumprod.to(t.device)[t]
        return abar / (1 - abar)

    # ---------------------------------------------------------------- forward process
    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """``x_t = sqrt(ᾱ_t) x0 + sqrt(1-ᾱ_t) ε``; ``x0, noise (B, ...)``, ``t (B,)``."""
        alpha, sigma = self.alpha_sigma(t, x0)
        return alpha * x0 + sigma * noise

    def q_posterior(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and clipped log-variance of ``q(x_{t-1} | x_t, x0)``."""
        mean = self.gather(self.posterior_mean_coef1, t, x_t) * x0 + self.gather(self.posterior_mean_coef2, t, x_t) * x_t
        return mean, self.gather(self.posterior_log_variance_clipped, t, x_t)

    def learned_log_variance(self, interpolation: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """DiT/ADM learned range: ``log σ² = frac·log β_t + (1-frac)·log β̃_t`` with ``frac = (v + 1)/2``."""
        min_log = self.gather(self.posterior_log_variance_clipped, t, interpolation)
        max_log = self.gather(torch.log(self.betas), t, interpolation)
        frac = (interpolation + 1) / 2
        return frac * max_log + (1 - frac) * min_log

    # ---------------------------------------------------------------- respacing
    def respace(self, spacing: int | str, rule: Spacing = "adm") -> "NoiseSchedule":
        """A schedule over the kept steps with ``β'_i = 1 - ᾱ_{k_i}/ᾱ_{k_{i-1}}`` and ``timestep_map`` to original t.

        ``rule``: ``adm`` keeps :func:`space_timesteps` (DiT/ADM); ``big_vision`` keeps :func:`big_vision_timesteps`
        (UMD's DDIM; ``spacing`` is then a step count).
        """
        if rule == "adm":
            kept = space_timesteps(self.num_steps, spacing)
        elif rule == "big_vision":
            kept = big_vision_timesteps(self.num_steps, int(spacing))
        else:
            raise ValueError(f"unknown timestep spacing {rule!r}; expected 'adm' or 'big_vision'")
        previous = torch.tensor(1.0, dtype=torch.float64)
        betas = []
        for k in kept:
            betas.append(1 - self.alphas_cumprod[k] / previous)
            previous = self.alphas_cumprod[k]
        original_map = self.timestep_map[torch.tensor(kept)]
        return NoiseSchedule.from_betas(torch.stack(betas), original_map)
