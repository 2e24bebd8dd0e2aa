"""Features of a method or backbone over images and datasets, for probes (the protocol: :mod:`maskdiff.backbones.features`)."""

from __future__ import annotations

from collections.abc import Iterable, Sized
from itertools import islice
from typing import Any

import torch

from maskdiff.backbones.base import Backbone
from maskdiff.backbones.features import FeatureSpec, backbone_features, resolve_spec
from maskdiff.data.loaders import EvalLoader
from maskdiff.diffusion.schedules import NoiseSchedule
from maskdiff.methods.base import MaskDiffModule
from maskdiff.modes import evaluating
from maskdiff.progress import progress as progress_bar


def resolve_backbone(module_or_backbone: MaskDiffModule | Backbone, use_ema: bool = True) -> Backbone:
    """The backbone of a method (its EMA copy when ``use_ema`` and it has one), or ``module_or_backbone`` itself."""
    if isinstance(module_or_backbone, MaskDiffModule):
        return module_or_backbone.inference_backbone(use_ema)
    if isinstance(module_or_backbone, Backbone):
        return module_or_backbone
    raise TypeError(f"{type(module_or_backbone).__name__} is neither a maskdiff method nor a backbone")


def method_schedule(module_or_backbone: MaskDiffModule | Backbone) -> tuple[NoiseSchedule | None, int]:
    """``(schedule, model_time_offset)`` of a method's corruption (what ``FeatureSpec.noise_t`` noises with and how
    its backbone counts timesteps); ``(None, 0)`` for a bare backbone or a noise-free method."""
    if isinstance(module_or_backbone, MaskDiffModule):
        return module_or_backbone.corruption.schedule, module_or_backbone.corruption.model_time_offset
    return None, 0


def resolve_method_spec(module_or_backbone: MaskDiffModule | Backbone, spec: FeatureSpec) -> FeatureSpec:
    """:func:`~maskdiff.backbones.features.resolve_spec` against the backbone ``spec`` reads, with the method's time
    offset (a noised UMD probe at ``noise_t`` 50 conditions on 51)."""
    return resolve_spec(resolve_backbone(module_or_backbone, spec.use_ema), spec, method_schedule(module_or_backbone)[1])


def images_to_tokens(module_or_backbone: MaskDiffModule | Backbone, images: torch.Tensor) -> torch.Tensor:
    """A data batch ``(B, C, H, W)`` (video: ``(B, C, T, H, W)``) -> tokens ``(B, N, P)``: the method's
    ``batch_tokens`` (images through the autoencoder, pre-encoded latents as they are), or a bare backbone's
    patchifier."""
    if isinstance(module_or_backbone, MaskDiffModule):
        return module_or_backbone.batch_tokens(images)
    return module_or_backbone.patchifier.patchify(images)


@torch.no_grad()
def extract_features(
    module_or_backbone: MaskDiffModule | Backbone,
    images: torch.Tensor,
    spec: FeatureSpec,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Frozen pooled features ``(B, D)`` (float32) of ``images (B, C, H, W)`` or clips ``(B, C, T, H, W)`` (``mean``
    pools a video backbone's tokens over space and time), with the backbone in eval mode.

    ``module_or_backbone`` is a maskdiff method (its ``to_tokens`` and ``inference_backbone(spec.use_ema)`` are used)
    or a bare backbone (its patchifier is used). The backbone's train/eval mode is restored afterwards. With
    ``spec.noise_t`` the tokens are noised with the method's schedule and ``generator`` (default: seeded with
    ``spec.noise_seed``).
    """
    backbone = resolve_backbone(module_or_backbone, spec.use_ema)
    spec = resolve_method_spec(module_or_backbone, spec)
    schedule = method_schedule(module_or_backbone)[0]
    device = next(backbone.parameters()).device
    with evaluating(backbone):
        tokens = images_to_tokens(module_or_backbone, images.to(device))
        return backbone_features(backbone, tokens, spec, schedule, generator).float()


def known_length(batches: Iterable[Any]) -> int | None:
    """How many batches ``batches`` holds: an :class:`~maskdiff.data.loaders.EvalLoader`'s planned batches,
    ``len(batches)``, or ``None`` when it has no length (a DataLoader over an iterable dataset without one raises
    ``TypeError`` from ``len``)."""
    if isinstance(batches, EvalLoader):
        return batches.batches
    if not isinstance(batches, Sized):
        return None
    try:
        return len(batches)
    except TypeError:
        return None


def extract_dataset_features(
    module_or_backbone: MaskDiffModule | Backbone,
    batches: Iterable[Any],
    spec: FeatureSpec,
    max_batches: int | None = None,
    progress: bool | None = None,
    desc: str = "features",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Features ``(M, D)`` and labels ``(M,)`` (``None`` when the batches carry none) of every batch, on the CPU.

    Batches are ``(images, labels)`` or bare images; empty batches are skipped. The noise of ``spec.noise_t`` comes
    from one generator seeded with ``spec.noise_seed`` for all batches, so the same data in the same order give the
    same features. ``progress``: a bar of the batches called ``desc`` (``None``: when stderr is a terminal, see
    :mod:`maskdiff.progress`).
    """
    spec = resolve_method_spec(module_or_backbone, spec)
    generator = torch.Generator().manual_seed(spec.noise_seed)
    features, labels, unlabeled = [], [], False
    total = known_length(batches)
    if max_batches is not None and total is not None:
        total = min(total, max_batches)
    with progress_bar(islice(batches, max_batches), desc=desc, total=total, unit="batch", enabled=progress) as bar:
        for batch in bar:
            if isinstance(batch, (tuple, list)):
                images, batch_labels = batch[0], (batch[1] if len(batch) > 1 else None)
            else:
                images, batch_labels = batch, None
            if images.shape[0] == 0:
                continue
            features.append(extract_features(module_or_backbone, images, spec, generator).cpu())
            if batch_labels is None:
                unlabeled = True
            else:
                labels.append(torch.as_tensor(batch_labels).long().cpu())
    if not features:
        raise ValueError("no batches to extract features from (the data split is empty)")
    return torch.cat(features), None if unlabeled else torch.cat(labels)
