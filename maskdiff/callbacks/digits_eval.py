"""Judge generated digits during training: digits Fréchet distance and class consistency (EMA weights)."""

from __future__ import annotations

import time

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from maskdiff.callbacks.sample_grid import grid_labels
from maskdiff.evaluation.digits_judge import score_digits
from maskdiff.samplers.base import Sampler
from maskdiff.samplers.ddim import DDIMSampler
from maskdiff.samplers.guidance import ClassifierFreeGuidance


class DigitsEvaluation(L.Callback):
    """Every ``every_n_steps`` (0 = only at the end of fitting) generate ``per_class`` samples of each digit with
    fixed noise and score them with :func:`~maskdiff.evaluation.digits_judge.score_digits`.

    Logs ``eval/digits_fd`` and ``eval/class_consistency``; ``history`` keeps ``(step, fd, consistency)`` and
    ``seconds`` the time spent evaluating.
    Generation runs on rank 0 only (no collectives), so it is safe under DDP.

    Args:
        every_n_steps: evaluation period in optimizer steps.
        per_class: samples per digit (10 digits).
        sampler: sampler to use (default DDIM-50).
        cfg_scale: guidance scale; ``None`` uses the method's own guidance.
        seed: noise seed (the same seed evaluates every checkpoint on the same noise).
        use_ema: sample with the EMA backbone when there is one.
    """

    def __init__(
        self,
        every_n_steps: int = 0,
        per_class: int = 30,
        sampler: Sampler | None = None,
        cfg_scale: float | None = None,
        seed: int = 0,
        use_ema: bool = True,
    ) -> None:
        self.every_n_steps = every_n_steps
        self.per_class = per_class
        self.sampler = sampler or DDIMSampler(50)
        self.cfg_scale = cfg_scale
        self.seed = seed
        self.use_ema = use_ema
        self.history: list[tuple[int, float, float]] = []
        self.seconds = 0.0

    @torch.no_grad()
    def evaluate(self, trainer: L.Trainer, pl_module) -> None:
        if trainer.global_rank != 0 or (self.history and self.history[-1][0] == trainer.global_step):
            return
        started = time.perf_counter()
        labels = grid_labels(list(range(10)), self.per_class)
        guidance = None if self.cfg_scale is None else ClassifierFreeGuidance(self.cfg_scale)
        images = pl_module.generate(labels, sampler=self.sampler, guidance=guidance,
                                    generator=torch.Generator().manual_seed(self.seed), use_ema=self.use_ema)
        score = score_digits(images, labels)
        self.history.append((trainer.global_step, score.frechet_distance, score.class_consistency))
        self.seconds += time.perf_counter() - started
        for logger in trainer.loggers:
            logger.log_metrics({"eval/digits_fd": score.frechet_distance, "eval/class_consistency": score.class_consistency},
                               step=trainer.global_step)
        trainer.callback_metrics["eval/digits_fd"] = torch.tensor(score.frechet_distance)
        trainer.callback_metrics["eval/class_consistency"] = torch.tensor(score.class_consistency)
        rank_zero_info(f"step {trainer.global_step}: digits FD {score.frechet_distance:.2f}, class consistency "
                       f"{score.class_consistency:.3f} ({len(labels)} samples; judge accuracy {score.judge_accuracy:.3f})")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0:
            self.evaluate(trainer, pl_module)

    def on_fit_end(self, trainer, pl_module) -> None:
        self.evaluate(trainer, pl_module)
