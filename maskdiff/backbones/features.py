"""Frozen features of a backbone for probes and fine-tuning: which tokens, after which block, at which timestep.

A :class:`FeatureSpec` names the protocol; :func:`backbone_features` applies it to tokens.

Timesteps: a backbone whose features are conditioned on timesteps (``features_take_timesteps``: DiT, MDT, UMD) is
always run at one fixed timestep for every image. ``timestep=None`` resolves to 0 for such backbones (the least noisy
level; UMD's "t=0 = clean" convention) and is logged; other backbones (MAE, DiffMAE's encoder) refuse a timestep.

Noise: by default the input is the clean image and the timestep only conditions the network. ``noise_t`` probes as
UMD's paper probes its DiT-like and MaskDiT-like baselines (big_vision's ``noised_predict``): the input tokens are
noised to ``x_t = √ᾱ_t x0 + √(1-ᾱ_t) ε`` at schedule step ``noise_t`` with the method's own schedule, ε drawn from a
generator seeded with ``noise_seed`` (reproducible features), and the backbone is conditioned on the timestep it sees
for that step in training (``noise_t`` + the corruption's ``model_time_offset``: UMD's t = 50 -> 51).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any, get_args

import torch

from maskdiff.backbones.base import Backbone, Pooling
from maskdiff.diffusion.schedules import NoiseSchedule

log = logging.getLogger("maskdiff.features")

POOLINGS: tuple[str, ...] = get_args(Pooling)


@dataclass(frozen=True)
class FeatureSpec:
    """How features are taken from a backbone.

    Args:
        pooling: ``cls``: the first prefix token (needs ``num_prefix_tokens >= 1``); ``mean``: the mean of the
            patch tokens, prefix tokens excluded; ``prefix_mean``: the mean of the prefix tokens (UMD's registers).
        depth: run the first ``depth`` encoder blocks (0..``num_blocks``; no final norm); ``None``: all blocks and
            the encoder's final norm if it has one (MAE's linear-probe features), except ``mean`` pooling on a
            backbone whose ``global_pool_norm`` is not None (MAE): the mean of the patch tokens after the last block, before the
            final norm, through ``global_pool_norm`` (``fc_norm``), as MAE's official ``global_pool`` path.
        timestep: the timestep a time-conditioned backbone is conditioned on (``None``: 0, logged); must be
            ``None`` for backbones without timestep conditioning.
        use_ema: take the EMA backbone of a method when it has one.
        noise_t: noise the input to this schedule step before the backbone sees it (``None``: clean input); the
            timestep then defaults to ``noise_t`` + the method's ``model_time_offset``.
        noise_seed: seeds the noise of ``noise_t``.
    """

    pooling: Pooling = "cls"
    depth: int | None = None
    timestep: int | None = None
    use_ema: bool = True
    noise_t: int | None = None
    noise_seed: int = 0

    def __post_init__(self) -> None:
        if self.pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {self.pooling!r}; expected one of {', '.join(POOLINGS)}")
        if self.depth is not None and (not isinstance(self.depth, int) or self.depth < 0):
            raise ValueError(f"depth {self.depth!r} is invalid; expected null (all blocks + final norm) or an int >= 0")
        if self.timestep is not None and (not isinstance(self.timestep, int) or self.timestep < 0):
            raise ValueError(f"timestep {self.timestep!r} is invalid; expected null or an int >= 0")
        if self.noise_t is not None and (not isinstance(self.noise_t, int) or self.noise_t < 0):
            raise ValueError(f"noise_t {self.noise_t!r} is invalid; expected null (clean input) or a schedule step >= 0")

    def as_dict(self) -> dict[str, Any]:
        return {"pooling": self.pooling, "depth": self.depth, "timestep": self.timestep,
                "weights": "ema" if self.use_ema else "raw", "noise_t": self.noise_t,
                "noise_seed": self.noise_seed if self.noise_t is not None else None}


def resolve_spec(backbone: Backbone, spec: FeatureSpec, time_offset: int = 0) -> FeatureSpec:
    """``spec`` checked against ``backbone``, with ``timestep=None`` resolved for time-conditioned backbones: to
    ``noise_t + time_offset`` (the method's ``model_time_offset``) for noised inputs, else to 0."""
    prefix = backbone.num_prefix_tokens
    name = type(backbone).__name__
    if spec.pooling in ("cls", "prefix_mean") and prefix < 1:
        raise ValueError(f"pooling '{spec.pooling}' needs a cls/prefix token, but {name} has num_prefix_tokens={prefix}; use pooling 'mean'")
    if spec.depth is not None and spec.depth > backbone.num_blocks:
        raise ValueError(
            f"depth {spec.depth} is out of range; {name} has encoder blocks 0..{backbone.num_blocks} "
            "(or null for all blocks + final norm)"
        )
    if spec.noise_t is not None and not backbone.features_take_timesteps:
        raise ValueError(f"noise_t {spec.noise_t} was given, but {name} is not conditioned on timesteps; probe it on clean inputs")
    if backbone.features_take_timesteps:
        if spec.timestep is None and spec.noise_t is not None:
            return replace(spec, timestep=spec.noise_t + time_offset)
        if spec.timestep is None:
            log.warning("%s is time-conditioned and no timestep was given: probing at timestep 0", name)
            return replace(spec, timestep=0)
    elif spec.timestep is not None:
        raise ValueError(f"timestep {spec.timestep} was given, but {name} is not conditioned on timesteps; use timestep null")
    return spec


def pool_tokens(features: torch.Tensor, pooling: Pooling, num_prefix_tokens: int) -> torch.Tensor:
    """``(B, num_prefix_tokens + N, D)`` -> ``(B, D)``: the first token (``cls``), the mean of the prefix tokens
    (``prefix_mean``) or the mean of the N patch tokens (``mean``)."""
    if pooling == "cls":
        return features[:, 0]
    if pooling == "prefix_mean":
        return features[:, :num_prefix_tokens].mean(dim=1)
    return features[:, num_prefix_tokens:].mean(dim=1)


def noised_tokens(
    tokens: torch.Tensor, noise_t: int, schedule: NoiseSchedule | None, generator: torch.Generator | None = None
) -> torch.Tensor:
    """``x_t = √ᾱ_t x0 + √(1-ᾱ_t) ε`` of ``tokens (B, N, P)`` at schedule step ``noise_t``; ε ``(B, N, P)`` is drawn in
    float32 on the CPU from ``generator`` (the same noise on every device)."""
    if schedule is None:
        raise ValueError(f"noise_t {noise_t} needs a noise schedule, and this method has none (it adds no noise)")
    if not 0 <= noise_t < schedule.num_steps:
        raise ValueError(f"noise_t {noise_t} is out of range; the schedule has steps 0..{schedule.num_steps - 1}")
    noise = torch.randn(tokens.shape, generator=generator, dtype=torch.float32).to(tokens)
    t = torch.full((tokens.shape[0],), noise_t, dtype=torch.long, device=tokens.device)
    return schedule.q_sample(tokens, t, noise)


def backbone_features(
    backbone: Backbone,
    tokens: torch.Tensor,
    spec: FeatureSpec,
    schedule: NoiseSchedule | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pooled features ``(B, D)`` of ``tokens (B, N, P)`` under a resolved ``spec`` (keeps the autograd graph).

    With ``spec.noise_t`` the tokens are first noised with ``schedule`` (the method's) and ``generator`` (default: a
    new one seeded with ``spec.noise_seed``; pass one generator for all batches of a data set).
    """
    if spec.noise_t is not None:
        generator = generator if generator is not None else torch.Generator().manual_seed(spec.noise_seed)
        tokens = noised_tokens(tokens, spec.noise_t, schedule, generator)
    t = None
    if spec.timestep is not None:
        t = torch.full((tokens.shape[0],), spec.timestep, dtype=torch.long, device=tokens.device)
    pool_norm = backbone.global_pool_norm if spec.pooling == "mean" and spec.depth is None else None
    depth = backbone.num_blocks if pool_norm is not None else spec.depth
    pooled = pool_tokens(backbone.forward_features(tokens, t=t, depth=depth), spec.pooling, backbone.num_prefix_tokens)
    return pooled if pool_norm is None else pool_norm(pooled)
