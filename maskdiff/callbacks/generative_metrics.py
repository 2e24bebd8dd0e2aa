"""In-training FID / Inception Score on fixed noise and labels (a trend proxy, not a paper number)."""

from __future__ import annotations

import time

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from maskdiff.evaluation.evaluate import generate_samples
from maskdiff.evaluation.inception import (
    build_fid,
    build_inception_score,
    to_inception_uint8,
)
from maskdiff.samplers.base import Sampler
from maskdiff.samplers.guidance import ClassifierFreeGuidance


class GenerativeMetrics(L.Callback):
    """Every ``every_n_steps`` (and when training ends) generate ``num_samples`` images and log ``eval/fid``,
    ``eval/is`` and ``eval/is_std`` against the data module's validation images.

    Samples come from the EMA backbone with fixed, balanced labels and fixed per-sample noise
    (:func:`maskdiff.evaluation.evaluate.generate_samples`), so successive evaluations differ only by the weights.
    Real features are computed once, on the first evaluation, from ``datamodule.val_dataloader()`` and kept
    (``reset_real_features=False``). The metrics (torchmetrics, float64 FID states) live in this callback, not on
    the module, so Inception never enters a checkpoint; they are built on first use and moved to the module's device.

    Under DDP every rank generates its contiguous share of the fixed samples and reads its share of the validation
    images, and all ranks take part in ``compute()``; the values equal a single-process run's. Images go to the
    feature extractors as ``uint8 (B, 3, H, W)`` (grayscale repeated), like torch-fidelity's input.

    Args:
        every_n_steps: evaluation period in optimizer steps (0 = only when training ends).
        num_samples: generated images per evaluation (5k-10k for a stable proxy; FID is biased upward for small N).
        feature: Inception pool size for FID (64, 192, 768, 2048) or any module ``uint8 (B, 3, H, W) -> (B, D)``
            (e.g. :class:`~maskdiff.evaluation.inception.DigitsJudgeFeatures`).
        inception_score: ``True`` for Inception's logits, ``False`` to skip, or a module ``uint8 images -> (B, K)``
            logits whose score is logged as ``eval/is``.
        weights_path: Inception weights file (default ``$MASKDIFF_INCEPTION_WEIGHTS``, then torch-fidelity's cache
            file); never downloaded.
        sampler: sampler to use (default: the method's own).
        steps: respaced sampling steps (default: the sampler's).
        cfg_scale: guidance scale; ``None`` uses the method's own guidance.
        cfg_channels: guide only the first k channels (``None``: all).
        num_real: cap on the validation images used (``None``: all). Under DDP each rank keeps its share of the
            cap from its own validation range, so a capped real set depends on the world size; leave it unset for
            world-size-independent reference statistics.
        batch_size: images per generation and feature batch on each rank (noise is per sample: it changes samples
            only by float rounding).
        seed: seed of the labels, the noise and the Inception Score's split permutation.
        isc_splits: Inception Score splits.
        use_ema: sample with the EMA backbone when there is one.
        at_train_end: also evaluate when training ends (unless the last step was just evaluated).
    """

    def __init__(
        self,
        every_n_steps: int = 0,
        num_samples: int = 5000,
        feature: int | nn.Module = 2048,
        inception_score: bool | nn.Module = True,
        weights_path: str | None = None,
        sampler: Sampler | None = None,
        steps: int | None = None,
        cfg_scale: float | None = None,
        cfg_channels: int | None = None,
        num_real: int | None = None,
        batch_size: int = 64,
        seed: int = 0,
        isc_splits: int = 10,
        use_ema: bool = True,
        at_train_end: bool = True,
    ) -> None:
        if every_n_steps < 0:
            raise ValueError(f"every_n_steps must be >= 0 (0 = only when training ends), got {every_n_steps}")
        if num_samples < 2:
            raise ValueError(f"num_samples must be at least 2 for a covariance, got {num_samples}")
        if num_real is not None and num_real < 2:
            raise ValueError(f"num_real must be at least 2 (or null for all validation images), got {num_real}")
        self.every_n_steps = every_n_steps
        self.num_samples = num_samples
        self.feature = feature
        self.inception_score = inception_score
        self.weights_path = weights_path
        self.sampler = sampler
        self.steps = steps
        self.guidance = None if cfg_scale is None else ClassifierFreeGuidance(cfg_scale, cfg_channels)
        self.num_real = num_real
        self.batch_size = batch_size
        self.seed = seed
        self.isc_splits = isc_splits
        self.use_ema = use_ema
        self.at_train_end = at_train_end
        self.history: list[dict[str, float]] = []  # {"step", "eval/fid", ...} per evaluation
        self.seconds = 0.0
        self._fid = None
        self._isc = None
        self._real_count = 0

    # ------------------------------------------------------------------------------------------ metrics
    def _metrics_on(self, device: torch.device):
        if self._fid is None:
            self._fid = build_fid(self.feature, self.weights_path)
            if self.inception_score is True:
                self._isc = build_inception_score(None, self.weights_path, self.isc_splits)
            elif isinstance(self.inception_score, nn.Module):
                self._isc = build_inception_score(self.inception_score, splits=self.isc_splits)
        self._fid = self._fid.to(device)
        if self._isc is not None:
            self._isc = self._isc.to(device)
        return self._fid, self._isc

    def _add_real_images(self, trainer: L.Trainer, fid, device: torch.device) -> None:
        datamodule = trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "val_dataloader"):
            raise ValueError("GenerativeMetrics needs a data module with val_dataloader() for the real images")
        rank, world_size = trainer.global_rank, trainer.world_size
        share = None if self.num_real is None else (
            self.num_real * (rank + 1) // world_size - self.num_real * rank // world_size)
        for batch in datamodule.val_dataloader():
            images = batch[0] if isinstance(batch, (tuple, list)) else batch
            if share is not None:
                images = images[: share - self._real_count]
            if len(images):
                fid.update(to_inception_uint8(images.to(device)), real=True)
                self._real_count += len(images)
            if share is not None and self._real_count >= share:
                break

    @torch.no_grad()
    def compute(self, trainer: L.Trainer, pl_module) -> dict[str, float]:
        """Generate this rank's share of the samples and return the synchronised metrics (call on every rank)."""
        device = pl_module.device
        fid, isc = self._metrics_on(device)
        if self._real_count == 0:
            self._add_real_images(trainer, fid, device)
        for _, images, _ in generate_samples(
            pl_module, self.num_samples, self.seed, self.sampler, self.guidance, self.use_ema, self.steps,
            self.batch_size, trainer.global_rank, trainer.world_size,
        ):
            pixels = to_inception_uint8(images)
            fid.update(pixels, real=False)
            if isc is not None:
                isc.update(pixels)
        values = {"eval/fid": float(fid.compute())}
        fid.reset()
        if isc is not None:
            # torchmetrics gathers this list state (dist_reduce_fx=None) element by element, interleaving the ranks'
            # batches (and hanging when ranks hold different batch counts); one tensor per rank keeps the global order.
            isc.features = [torch.cat(isc.features)]
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed)
                mean, std = isc.compute()
            values.update({"eval/is": float(mean), "eval/is_std": float(std)})
            isc.reset()
        return values

    def evaluate(self, trainer: L.Trainer, pl_module) -> None:
        if self.history and self.history[-1]["step"] == trainer.global_step:
            return
        started = time.perf_counter()
        values = self.compute(trainer, pl_module)
        self.seconds += time.perf_counter() - started
        self.history.append({"step": trainer.global_step, **values})
        for logger in trainer.loggers:
            logger.log_metrics(values, step=trainer.global_step)
        for name, value in values.items():
            trainer.callback_metrics[name] = torch.tensor(value)
        shown = ", ".join(f"{name.removeprefix('eval/')} {value:.4g}" for name, value in values.items())
        rank_zero_info(f"step {trainer.global_step}: {shown} ({self.num_samples} samples, "
                       f"{self.seconds:.0f} s spent on generative metrics so far)")

    # ------------------------------------------------------------------------------------------ hooks
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0:
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.at_train_end:
            self.evaluate(trainer, pl_module)
