"""Exact resume: a run killed at step k and resumed from its last checkpoint continues exactly like the
uninterrupted run (model, EMA, optimizer, scheduler, step counter, randomness and data position restored)."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from maskdiff.tools.main import main
from tests.helpers import CONFIGS, DEBUG_CONFIG, config_in

EPOCH_SAMPLES = 5 * 16  # 5 batches of 16 per epoch: checkpoints fall mid-epoch
CRASH_STEP = 8  # killed while running step 8; the last checkpoint is the one of step 6
TOTAL_STEPS = 12


class CrashAtStep(L.Callback):
    """Kill the run (an exception, like a node failure) when it starts optimizer step ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step - 1:
            raise RuntimeError(f"simulated crash at step {self.step}")


class CrashAtMicroBatch(L.Callback):
    """Kill the run at micro-batch ``micro_batch`` of optimizer step ``step`` (gradient accumulation)."""

    def __init__(self, step: int, micro_batch: int) -> None:
        self.step = step
        self.micro_batch = micro_batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step - 1 and batch_idx % trainer.accumulate_grad_batches == self.micro_batch:
            raise RuntimeError(f"simulated crash at step {self.step}")


def resumable_config(tmp_path: Path, base: Path, overrides: dict) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path, _ = config_in(tmp_path, base)
    config = yaml.safe_load(path.read_text())
    trainer = config["trainer"]
    trainer.update(max_steps=TOTAL_STEPS, log_every_n_steps=1, limit_val_batches=0, num_sanity_val_steps=0,
                   enable_checkpointing=True)
    trainer["callbacks"] = [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"dirpath": str(tmp_path / "checkpoints"), "save_last": True, "every_n_train_steps": 3,
                       "save_top_k": -1}},
    ]
    config["data"]["init_args"].update(batch_size=16, train_samples_per_epoch=EPOCH_SAMPLES, **overrides.pop("data", {}))
    model_args = config["model"]["init_args"]
    for key, value in overrides.items():
        model_args[key] = value
    path.write_text(yaml.safe_dump(config))
    return path


def step_losses(log_root: Path) -> dict[int, float]:
    """``train/loss`` by optimizer step (1-based), over every CSV log version under ``log_root``."""
    losses = {}
    for metrics in sorted(log_root.rglob("metrics.csv")):
        with metrics.open() as handle:
            for row in csv.DictReader(handle):
                if row.get("train/loss"):
                    losses[int(row["step"]) + 1] = float(row["train/loss"])
    return losses


def run_with_crash_and_resume(tmp_path: Path, base: Path, overrides: dict, extra: tuple[str, ...] = (),
                              crash: str | None = None, final: str = "epoch=2-step=12.ckpt") -> tuple[dict, dict, dict, dict]:
    """(uninterrupted losses, resumed losses, uninterrupted final checkpoint, resumed final checkpoint); ``extra``
    are fit arguments of both runs, ``crash`` the crashing callback (default: at the start of step 8)."""
    straight = resumable_config(tmp_path / "straight", base, dict(overrides, data=dict(overrides.get("data", {}))))
    main(["fit", "--config", str(straight), *extra])

    crashed_dir = tmp_path / "crashed"
    crashed = resumable_config(crashed_dir, base, dict(overrides, data=dict(overrides.get("data", {}))))
    crash = crash or f"{{'class_path': 'tests.methods.test_resume.CrashAtStep', 'init_args': {{'step': {CRASH_STEP}}}}}"
    with pytest.raises(RuntimeError, match=f"simulated crash at step {CRASH_STEP}"):
        main(["fit", "--config", str(crashed), *extra, f"--trainer.callbacks+={crash}"])
    last = crashed_dir / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == 6
    main(["fit", "--config", str(crashed), *extra, "--ckpt_path", str(last)])

    return (
        step_losses(tmp_path / "straight" / "logs"),
        step_losses(crashed_dir / "logs"),
        torch.load(tmp_path / "straight" / "checkpoints" / final, weights_only=False),
        torch.load(crashed_dir / "checkpoints" / final, weights_only=False),
    )


def assert_same_run(straight_losses, resumed_losses, straight_ckpt, resumed_ckpt) -> None:
    assert sorted(straight_losses) == list(range(1, TOTAL_STEPS + 1))
    assert set(range(1, TOTAL_STEPS + 1)) <= set(resumed_losses)
    for step in range(7, TOTAL_STEPS + 1):  # the steps run after resuming
        assert resumed_losses[step] == pytest.approx(straight_losses[step], rel=1e-6, abs=1e-7), step
    # and the losses are not trivially equal: they change from step to step
    assert len({round(straight_losses[s], 6) for s in range(7, TOTAL_STEPS + 1)}) > 1
    assert resumed_ckpt["global_step"] == straight_ckpt["global_step"] == TOTAL_STEPS
    for key, value in straight_ckpt["state_dict"].items():
        torch.testing.assert_close(resumed_ckpt["state_dict"][key], value, rtol=1e-6, atol=1e-7, msg=key)
    straight_opt, resumed_opt = straight_ckpt["optimizer_states"][0]["state"], resumed_ckpt["optimizer_states"][0]["state"]
    for index, state in straight_opt.items():
        torch.testing.assert_close(resumed_opt[index]["exp_avg_sq"], state["exp_avg_sq"], rtol=1e-6, atol=1e-10)
    assert resumed_ckpt["lr_schedulers"] == straight_ckpt["lr_schedulers"]


@pytest.mark.slow
def test_generative_method_resumes_exactly(tmp_path, digits_cache, one_thread):
    """DiT with EMA, a warmup-cosine schedule and learned sigma; killed at step 8 mid-epoch, resumed from step 6."""
    scheduler = {"class_path": "maskdiff.optim.WarmupCosineLR",
                 "init_args": {"warmup_steps": 4, "total_steps": TOTAL_STEPS, "min_lr_ratio": 0.1}}
    results = run_with_crash_and_resume(tmp_path, DEBUG_CONFIG, {"lr_scheduler": scheduler})
    assert_same_run(*results)
    assert any(key.startswith("ema_backbone.") for key in results[2]["state_dict"])


@pytest.mark.slow
def test_masked_autoencoder_resumes_exactly_with_workers(tmp_path, digits_cache, one_thread):
    """MAE with random masking, read by a persistent data worker (the worker restarts on resume)."""
    overrides = {"data": {"num_workers": 1}}
    results = run_with_crash_and_resume(tmp_path, CONFIGS / "mae" / "mae_digits.yaml", overrides)
    assert_same_run(*results)


@pytest.mark.slow
def test_a_run_killed_mid_accumulation_resumes_exactly(tmp_path, digits_cache, one_thread):
    """MAE with random masking and 2 micro-batches per step, killed at the second micro-batch of step 8."""
    crash = (f"{{'class_path': 'tests.methods.test_resume.CrashAtMicroBatch', "
             f"'init_args': {{'step': {CRASH_STEP}, 'micro_batch': 1}}}}")
    results = run_with_crash_and_resume(tmp_path, CONFIGS / "mae" / "mae_digits.yaml", {},
                                        extra=("--trainer.accumulate_grad_batches", "2"), crash=crash,
                                        final="epoch=3-step=12.ckpt")
    assert_same_run(*results)
