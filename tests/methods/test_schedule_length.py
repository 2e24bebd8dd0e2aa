"""The learning-rate schedule spans the trainer's run (total_steps null) unless its length is set, with a warning
when that length differs from the run's."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch

from maskdiff.backbones import create_backbone
from maskdiff.errors import UserError
from maskdiff.methods import DiT
from maskdiff.optim import WarmupCosineLR

PEAK, WARMUP, MIN_RATIO = 0.01, 2, 0.1


def method_with_schedule(total_steps: int | None, max_steps: int, max_epochs: int | None = None) -> DiT:
    """A tiny DiT whose schedule factory is WarmupCosineLR(total_steps), attached to a trainer of ``max_steps``."""
    method = DiT(
        create_backbone("DiT-Nano/2", input_size=8, in_channels=1),
        optimizer=lambda params: torch.optim.SGD(params, lr=PEAK),
        lr_scheduler=lambda optimizer: WarmupCosineLR(optimizer, WARMUP, total_steps, MIN_RATIO),
    )
    method.trainer = L.Trainer(max_steps=max_steps, max_epochs=max_epochs, logger=False, enable_checkpointing=False,
                               enable_progress_bar=False, enable_model_summary=False)
    return method


def reference_lr(step: int, total: int) -> float:
    """Linear warm-up from PEAK / WARMUP, then cosine from PEAK to MIN_RATIO * PEAK at ``total``."""
    if step < WARMUP:
        return PEAK * (step + 1) / WARMUP
    progress = min(1.0, (step - WARMUP) / (total - WARMUP))
    return PEAK * (MIN_RATIO + (1 - MIN_RATIO) * 0.5 * (1 + math.cos(math.pi * progress)))


def rates(configured: dict, steps: int) -> list[float]:
    optimizer, scheduler = configured["optimizer"], configured["lr_scheduler"]["scheduler"]
    found = []
    for _ in range(steps):
        found.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return found + [optimizer.param_groups[0]["lr"]]


def test_a_schedule_of_null_length_spans_max_steps_and_ends_at_its_final_rate(capsys):
    configured = method_with_schedule(None, max_steps=9).configure_optimizers()
    assert configured["lr_scheduler"]["scheduler"].total_steps == 9
    found = rates(configured, 9)
    assert found == pytest.approx([reference_lr(step, 9) for step in range(10)], rel=1e-12)
    assert found[9] == pytest.approx(MIN_RATIO * PEAK, rel=1e-12) and found[8] > found[9]
    assert capsys.readouterr().err == ""


def test_an_explicit_length_other_than_the_run_is_kept_with_one_warning(capsys):
    configured = method_with_schedule(50, max_steps=9).configure_optimizers()
    assert configured["lr_scheduler"]["scheduler"].total_steps == 50
    assert rates(configured, 9) == pytest.approx([reference_lr(step, 50) for step in range(10)], rel=1e-12)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: ") and "50" in lines[0] and "9 steps" in lines[0]


def test_an_explicit_length_equal_to_the_run_or_constant_says_nothing(capsys):
    method_with_schedule(9, max_steps=9).configure_optimizers()
    method_with_schedule(0, max_steps=9).configure_optimizers()
    assert capsys.readouterr().err == ""


def test_a_schedule_of_null_length_refuses_an_endless_run():
    with pytest.raises(UserError, match="total_steps: null"):
        method_with_schedule(None, max_steps=-1, max_epochs=-1).configure_optimizers()


def test_without_a_trainer_a_null_length_stays_constant_after_warmup():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=PEAK)
    scheduler = WarmupCosineLR(optimizer, WARMUP, None, MIN_RATIO)
    assert [scheduler.factor(step) for step in (0, 1, 2, 1000)] == [0.5, 1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="total_steps"):
        WarmupCosineLR(optimizer, WARMUP, -1)
