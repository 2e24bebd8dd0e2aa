"""Frozen features of any maskdiff backbone for probes: which tokens, after which block, at which timestep.

A :class:`FeatureSpec` names the protocol; :func:`extract_features` applies it to a batch of images.

Timesteps: a time-conditioned backbone (DiT, MDT: anything with a ``t_embedder`` or ``time_conditioned = True``)
is always run at one fixed timestep for every image. ``timestep=None`` resolves to 0 for such backbones (the least
noisy level; UMD's "t=0 = clean" convention) and is logged; recognition backbones (MAE) refuse a timestep. The
input is the clean image either way: the timestep only conditions the network, no noise is added.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any, Literal, get_args

import torch
from torch import nn

from maskdiff.backbones.base import Backbone

log = logging.getLogger("maskdiff.evaluation")

Pooling = Literal["cls", "mean", "prefix_mean"]
POOLINGS: tuple[str, ...] = get_args(Pooling)


@dataclass(frozen=True)
class FeatureSpec:
    """How features are taken from a backbone.

    Args:
        pooling: ``cls``: the first prefix token (needs ``num_prefix_tokens >= 1``); ``mean``: the mean of the
            patch tokens, prefix tokens excluded; ``prefix_mean``: the mean of the prefix tokens (UMD's registers).
        depth: run the first ``depth`` encoder blocks (0..``num_blocks``; no final norm); ``None``: all blocks and
            the encoder's final norm if it has one (MAE's linear-probe features).
        timestep: the timestep a time-conditioned backbone is conditioned on (``None``: 0, logged); must be
            ``None`` for backbones without timestep conditioning.
        use_ema: take the EMA backbone of a method when it has one.
    """

    pooling: Pooling = "cls"
    depth: int | None = None
    timestep: int | None = None
    use_ema: bool = True

    def __post_init__(self) -> None:
        if self.pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {self.pooling!r}; expected one of {', '.join(POOLINGS)}")
        if self.depth is not None and (not isinstance(self.depth, int) or self.depth < 0):
            raise ValueError(f"depth {self.depth!r} is invalid; expected null (all blocks + final norm) or an int >= 0")
        if self.timestep is not None and (not isinstance(self.timestep, int) or self.timestep < 0):
            raise ValueError(f"timestep {self.timestep!r} is invalid; expected null or an int >= 0")

    def as_dict(self) -> dict[str, Any]:
        return {"pooling": self.pooling, "depth": self.depth, "timestep": self.timestep,
                "weights": "ema" if self.use_ema else "raw"}


def is_time_conditioned(backbone: nn.Module) -> bool:
    """Whether ``backbone`` needs a timestep: its ``time_conditioned`` attribute, else whether it has a ``t_embedder``."""
    flag = getattr(backbone, "time_conditioned", None)
    return bool(flag) if flag is not None else hasattr(backbone, "t_embedder")


def resolve_backbone(module_or_backbone: nn.Module, use_ema: bool = True) -> Backbone:
    """The backbone of a method (its EMA copy when ``use_ema`` and it has one), or ``module_or_backbone`` itself."""
    if hasattr(module_or_backbone, "inference_backbone"):
        return module_or_backbone.inference_backbone(use_ema)
    if hasattr(module_or_backbone, "forward_features"):
        return module_or_backbone
    raise TypeError(f"{type(module_or_backbone).__name__} is neither a maskdiff method nor a backbone (no forward_features)")


def resolve_spec(backbone: Backbone, spec: FeatureSpec) -> FeatureSpec:
    """``spec`` checked against ``backbone``, with ``timestep=None`` resolved to 0 for time-conditioned backbones."""
    prefix = getattr(backbone, "num_prefix_tokens", 0)
    name = type(backbone).__name__
    if spec.pooling in ("cls", "prefix_mean") and prefix < 1:
        raise ValueError(f"pooling '{spec.pooling}' needs a cls/prefix token, but {name} has num_prefix_tokens={prefix}; use pooling 'mean'")
    if spec.depth is not None and spec.depth > backbone.num_blocks:
        raise ValueError(
            f"depth {spec.depth} is out of range; {name} has encoder blocks 0..{backbone.num_blocks} "
            "(or null for all blocks + final norm)"
        )
    if is_time_conditioned(backbone):
        if spec.timestep is None:
            log.warning("%s is time-conditioned and no timestep was given: probing at timestep 0", name)
            return replace(spec, timestep=0)
    elif spec.timestep is not None:
        raise ValueError(f"timestep {spec.timestep} was given, but {name} is not conditioned on timesteps; use timestep null")
    return spec


def default_pooling(backbone: nn.Module) -> Pooling:
    """The backbone's own ``default_pooling`` (UMD: ``prefix_mean``), else ``cls`` with a prefix token, else ``mean``."""
    own = getattr(backbone, "default_pooling", None)
    if own is not None:
        return own
    return "cls" if getattr(backbone, "num_prefix_tokens", 0) >= 1 else "mean"


def pool_tokens(features: torch.Tensor, pooling: Pooling, num_prefix_tokens: int) -> torch.Tensor:
    """``(B, num_prefix_tokens + N, D)`` -> ``(B, D)``: the first token (``cls``), the mean of the prefix tokens
    (``prefix_mean``) or the mean of the N patch tokens (``mean``)."""
    if pooling == "cls":
        return features[:, 0]
    if pooling == "prefix_mean":
        return features[:, :num_prefix_tokens].mean(dim=1)
    return features[:, num_prefix_tokens:].mean(dim=1)


def images_to_tokens(module_or_backbone: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """A data batch ``(B, C, H, W)`` (video: ``(B, C, T, H, W)``) -> tokens ``(B, N, P)``: the method's
    ``batch_tokens`` (images through the autoencoder, pre-encoded latents as they are) or ``to_tokens``, or a bare
    backbone's patchifier."""
    for name in ("batch_tokens", "to_tokens"):
        if hasattr(module_or_backbone, name):
            return getattr(module_or_backbone, name)(images)
    return module_or_backbone.patchifier.patchify(images)


def backbone_features(backbone: Backbone, tokens: torch.Tensor, spec: FeatureSpec) -> torch.Tensor:
    """Pooled features ``(B, D)`` of ``tokens (B, N, P)`` under a resolved ``spec`` (keeps the autograd graph)."""
    t = None
    if spec.timestep is not None:
        t = torch.full((tokens.shape[0],), spec.timestep, dtype=torch.long, device=tokens.device)
    features = backbone.forward_features(tokens, t=t, depth=spec.depth)
    return pool_tokens(features, spec.pooling, getattr(backbone, "num_prefix_tokens", 0))


@torch.no_grad()
def extract_features(module_or_backbone: nn.Module, images: torch.Tensor, spec: FeatureSpec) -> torch.Tensor:
    """Frozen pooled features ``(B, D)`` (float32) of ``images (B, C, H, W)`` or clips ``(B, C, T, H, W)`` (``mean``
    pools a video backbone's tokens over space and time), with the backbone in eval mode.

    ``module_or_backbone`` is a maskdiff method (its ``to_tokens`` and ``inference_backbone(spec.use_ema)`` are used)
    or a bare backbone (its patchifier is used). The backbone's train/eval mode is restored afterwards.
    """
    backbone = resolve_backbone(module_or_backbone, spec.use_ema)
    spec = resolve_spec(backbone, spec)
    device = next(backbone.parameters()).device
    was_training = backbone.training
    backbone.eval()
    try:
        tokens = images_to_tokens(module_or_backbone, images.to(device))
        return backbone_features(backbone, tokens, spec).float()
    finally:
        backbone.train(was_training)


def extract_dataset_features(
    module_or_backbone: nn.Module, batches: Iterable[Any], spec: FeatureSpec, max_batches: int | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Features ``(M, D)`` and labels ``(M,)`` (``None`` when the batches carry none) of every batch, on the CPU.

    Batches are ``(images, labels)`` or bare images; empty batches are skipped.
    """
    spec = resolve_spec(resolve_backbone(module_or_backbone, spec.use_ema), spec)
    features, labels, unlabeled = [], [], False
    for index, batch in enumerate(batches):
        if max_batches is not None and index >= max_batches:
            break
        if isinstance(batch, (tuple, list)):
            images, batch_labels = batch[0], (batch[1] if len(batch) > 1 else None)
        else:
            images, batch_labels = batch, None
        if images.shape[0] == 0:
            continue
        features.append(extract_features(module_or_backbone, images, spec).cpu())
        if batch_labels is None:
            unlabeled = True
        else:
            labels.append(torch.as_tensor(batch_labels).long().cpu())
    if not features:
        raise ValueError("no batches to extract features from (the data split is empty)")
    return torch.cat(features), None if unlabeled else torch.cat(labels)
