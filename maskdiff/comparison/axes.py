"""The axes of a comparison, measured the same way for every method: generation, inpainting, representation, cost.

* generation: class-conditional samples (EMA weights, fixed noise, DDIM, guidance) scored by the digits judge:
  Fréchet distance of its features to the held-out digits and class consistency;
* inpainting: the same pixel masks on the same held-out digits through each method's own
  :meth:`~maskdiff.methods.MaskDiffModule.inpaint` mode (``reconstruct``, ``repaint``, ``hidden_chain``): PSNR on the
  hidden pixels and the digits Fréchet distance of the completed images;
* representation: linear probe (BN + linear head, SGD) and few-shot probe (``fewshot_lsr``) of frozen features;
* cost: training images/s over the training steps alone (:class:`StepTimer`), parameters, seconds per image.
"""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch

from maskdiff.backbones.features import FeatureSpec
from maskdiff.callbacks.sample_grid import grid_labels
from maskdiff.comparison.settings import GenerationSettings, InpaintingSettings, MethodSettings, RepresentationSettings
from maskdiff.evaluation.digits_judge import score_digits
from maskdiff.evaluation.features import extract_dataset_features, resolve_backbone
from maskdiff.evaluation.few_shot import few_shot_probe
from maskdiff.evaluation.linear_probe import run_linear_probe
from maskdiff.inpainting.masks import make_mask
from maskdiff.methods.base import MaskDiffModule
from maskdiff.progress import progress, sampling_progress
from maskdiff.samplers.ddim import DDIMSampler
from maskdiff.samplers.guidance import ClassifierFreeGuidance

PIXEL_RANGE = 2.0  # images live in [-1, 1]


class StepTimer(L.Callback):
    """Wall time of the training steps alone (batch start to batch end: forward, backward, optimizer, EMA), without
    data loading between steps, checkpointing or the first ``skip`` (warm-up) steps.

    ``images_per_second`` = images of the timed steps / their seconds."""

    def __init__(self, skip: int = 5) -> None:
        self.skip = skip
        self.seconds = 0.0
        self.images = 0
        self._started: float | None = None
        self._seen = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._started = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._seen += 1
        if self._started is None or self._seen <= self.skip:
            return
        self.seconds += time.perf_counter() - self._started
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        self.images += int(images.shape[0])

    @property
    def images_per_second(self) -> float:
        if self.images == 0:
            raise ValueError(f"no training step was timed: the run had {self._seen} steps and the first {self.skip} "
                             "are skipped; lower pretrain.timing_skip_steps or train longer")
        return self.images / self.seconds


def parameter_count(module: MaskDiffModule) -> int:
    """Parameters of the method's trained backbone (encoder, decoder and heads; not its EMA copy)."""
    return sum(parameter.numel() for parameter in module.backbone.parameters())


def ddim(settings: GenerationSettings) -> DDIMSampler:
    """The one sampler every diffusion method generates and inpaints with."""
    return DDIMSampler(settings.sampler_steps, eta=settings.eta)


@torch.no_grad()
def judge_generation(module: MaskDiffModule, settings: GenerationSettings, seed: int,
                     enabled: bool | None = None) -> dict[str, float]:
    """``per_class`` samples of each digit (EMA weights, noise seeded with ``seed``), scored by the digits judge:
    ``digits_fd``, ``class_consistency`` (in [0, 1]) and ``sample_s_per_image``."""
    labels = grid_labels(list(range(10)), settings.per_class)
    sampler = ddim(settings)
    bar, callback = sampling_progress(settings.sampler_steps, f"sampling {len(labels)} digits", enabled)
    started = time.perf_counter()
    images = module.generate(labels, sampler=sampler, guidance=ClassifierFreeGuidance(settings.cfg_scale),
                             generator=torch.Generator().manual_seed(seed), callback=callback)
    seconds = time.perf_counter() - started
    bar.close()
    score = score_digits(images.cpu(), labels)
    return {"digits_fd": score.frechet_distance, "class_consistency": score.class_consistency,
            "sample_s_per_image": seconds / len(labels), "samples": len(labels)}


def inpainting_masks(settings: InpaintingSettings, count: int, size: int, token_pixels: int,
                     seed: int) -> dict[str, torch.Tensor]:
    """One ``(count, 1, size, size)`` bool pixel mask per kind (True = generate): the same for every method. The
    ``random`` kind draws its tokens per image from one generator seeded with ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    masks = {}
    for kind in settings.masks:
        if kind == "random":
            masks[kind] = torch.stack([make_mask("random", size, settings.random_ratio, token_pixels, generator=generator)
                                       for _ in range(count)])[:, None]
        else:
            one = make_mask(kind, size, settings.box_ratio, token_pixels, side=settings.side)
            masks[kind] = one.expand(count, 1, size, size)
    return masks


def hidden_psnr(completed: torch.Tensor, original: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean over images of the PSNR (dB, peak-to-peak 2 for [-1, 1]) on the hidden pixels ``mask (B, 1, H, W)`` of
    ``completed`` against ``original`` ``(B, C, H, W)``; a perfect image counts as 100 dB."""
    hidden = mask.expand_as(original).float()
    error = ((completed.clamp(-1, 1) - original) ** 2 * hidden).flatten(1).sum(1) / hidden.flatten(1).sum(1).clamp_min(1)
    psnr = 10 * torch.log10(PIXEL_RANGE**2 / error.clamp_min(PIXEL_RANGE**2 * 1e-10))
    return psnr.mean().item()


@torch.no_grad()
def evaluate_inpainting(module: MaskDiffModule, images: torch.Tensor, labels: torch.Tensor,
                        masks: dict[str, torch.Tensor], settings: InpaintingSettings, generation: GenerationSettings,
                        seed: int, enabled: bool | None = None) -> tuple[dict[str, dict[str, float]], dict[str, torch.Tensor]]:
    """Inpaint ``images (B, C, H, W)`` under every mask of ``masks`` in the method's own mode; returns the figures
    per mask (``psnr``, ``digits_fd``, ``s_per_image``) and the completed images per mask."""
    figures, completed = {}, {}
    sampler = ddim(generation)
    for kind, mask in progress(masks.items(), desc=f"inpainting ({type(module).__name__})", total=len(masks),
                               unit="mask", enabled=enabled):
        given = labels if settings.conditioned and module.conditional else None
        started = time.perf_counter()
        filled = module.inpaint(images, mask, given, sampler=sampler, generator=torch.Generator().manual_seed(seed)).cpu()
        seconds = time.perf_counter() - started
        completed[kind] = filled
        figures[kind] = {"psnr": hidden_psnr(filled, images, mask), "digits_fd": score_digits(filled).frechet_distance,
                         "s_per_image": seconds / len(images)}
    return figures, completed


def feature_spec(module: MaskDiffModule, method: MethodSettings, t: int | None) -> FeatureSpec:
    """The probe's feature: ``method.pooling`` on clean input (t = 0 for a time-conditioned backbone), or on input
    noised to ``t`` > 0 with the method's schedule."""
    if not resolve_backbone(module).features_take_timesteps:
        return FeatureSpec(pooling=method.pooling)
    if not t:
        return FeatureSpec(pooling=method.pooling, timestep=0)
    return FeatureSpec(pooling=method.pooling, noise_t=t)


def selection_split(count: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices ``(fit, held_out)`` of ``count`` training rows: a seeded ``fraction`` held out to pick a timestep."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"representation.selection_fraction {fraction} is outside (0, 1)")
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    held = max(1, round(count * fraction))
    return order[held:], order[:held]


def linear_probe(settings: RepresentationSettings, train: tuple, val: tuple, seed: int) -> float:
    result = run_linear_probe(*train, *val, epochs=settings.epochs, batch_size=settings.batch_size,
                              base_lr=settings.base_lr, optimizer="sgd", warmup_epochs=settings.warmup_epochs, seed=seed,
                              num_classes=10)
    return result["top1"]


def probe_representation(module: MaskDiffModule, method: MethodSettings, settings: RepresentationSettings,
                         train_batches, val_batches, seed: int) -> dict[str, Any]:
    """Linear-probe and few-shot top-1 of ``module``'s frozen features; ``train_batches``/``val_batches`` are
    callables giving the splits' batches. With ``method.sweep_timesteps`` every timestep of ``settings.timesteps`` is
    probed on a held-out share of the training digits and the best one (ties: the smaller t) is reported."""
    time_conditioned = resolve_backbone(module).features_take_timesteps
    candidates = list(settings.timesteps) if method.sweep_timesteps and time_conditioned else [0 if time_conditioned else None]
    if not candidates:
        raise ValueError("representation.timesteps is empty; give at least one timestep to sweep")
    sweep, best = {}, None
    for t in candidates:
        spec = feature_spec(module, method, t)
        train = extract_dataset_features(module, train_batches(), spec)
        if len(candidates) > 1:
            fit_rows, held_rows = selection_split(len(train[0]), settings.selection_fraction, seed)
            sweep[t] = linear_probe(settings, (train[0][fit_rows], train[1][fit_rows]),
                                    (train[0][held_rows], train[1][held_rows]), seed)
        if best is None or (len(candidates) > 1 and sweep[t] > sweep[best[0]]):
            best = (t, spec, train)
    t, spec, train = best
    val = extract_dataset_features(module, val_batches(), spec)
    described = spec.pooling if t is None else f"{spec.pooling}, t={t}" + (" (noised)" if t else " (clean)")
    return {"linear_top1": linear_probe(settings, train, val, seed),
            "few_shot_top1": few_shot_probe(*train, *val, shots=settings.shots, l2_reg=settings.l2_reg, seed=seed,
                                            num_classes=10),
            "feature": described, "timestep": t, "sweep_held_out_top1": {str(k): v for k, v in sweep.items()}}
