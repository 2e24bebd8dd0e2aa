"""Sample grids go to the active loggers: TensorBoard's Images tab (the same pixels as the PNG), CSV runs the PNG."""

from __future__ import annotations

import io

import lightning as L
import numpy as np
import pytest
import yaml
from lightning.fabric.loggers import tensorboard as fabric_tensorboard
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from PIL import Image
from tensorboard.backend.event_processing import event_accumulator

from maskdiff.backbones import DiT as DiTBackbone
from maskdiff.callbacks import SampleGrid
from maskdiff.callbacks.image_logging import log_image
from maskdiff.data import DigitsDataModule
from maskdiff.images import label_width
from maskdiff.methods import DiT
from maskdiff.samplers import DDIMSampler
from maskdiff.tools.main import report, run
from tests.helpers import CONFIGS

pytestmark = pytest.mark.usefixtures("one_thread")


def tensorboard_images(log_dir, tag: str) -> list[tuple[int, np.ndarray]]:
    """``[(step, pixels (H, W, 3) uint8)]`` stored under ``tag`` in the event files of ``log_dir``."""
    accumulator = event_accumulator.EventAccumulator(str(log_dir), size_guidance={event_accumulator.IMAGES: 0})
    accumulator.Reload()
    assert tag in accumulator.Tags()["images"], accumulator.Tags()
    return [(event.step, np.asarray(Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB")))
            for event in accumulator.Images(tag)]


def test_the_final_grid_goes_to_tensorboard_and_to_the_csv_runs_png(tmp_path, digits_cache):
    L.seed_everything(0)
    backbone = DiTBackbone(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=1, num_heads=2, num_classes=10)
    csv_logger, tensorboard = CSVLogger(tmp_path / "csv", name="run"), TensorBoardLogger(tmp_path / "tb", name="run")
    grid = SampleGrid(classes=[3, 7], per_class=2, sampler=DDIMSampler(2))
    trainer = L.Trainer(accelerator="cpu", max_steps=1, limit_val_batches=0, num_sanity_val_steps=0,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        logger=[csv_logger, tensorboard], callbacks=[grid], default_root_dir=tmp_path)
    trainer.fit(DiT(backbone=backbone, ema_decay=0.9), datamodule=DigitsDataModule(image_size=8, batch_size=8))

    assert grid.last_path == tmp_path / "csv" / "run" / "version_0" / "samples" / "final.png"
    written = np.asarray(Image.open(grid.last_path).convert("RGB"))
    assert written.shape == (2 * 65 + 1, label_width(["3", "7"]) + 2 * 65 + 1, 3)  # 8 px digits shown at 64 px
    [(step, logged)] = tensorboard_images(tensorboard.log_dir, "samples")
    assert step == 1
    np.testing.assert_array_equal(logged, written)


def test_log_image_reaches_only_image_loggers_and_takes_hwc_uint8(tmp_path):
    csv_logger, tensorboard = CSVLogger(tmp_path / "csv"), TensorBoardLogger(tmp_path / "tb")
    trainer = L.Trainer(accelerator="cpu", logger=[csv_logger, tensorboard], enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False)
    pixels = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    assert log_image(trainer, "panel", pixels, step=7) == [tensorboard]
    tensorboard.experiment.flush()
    [(step, logged)] = tensorboard_images(tensorboard.log_dir, "panel")
    assert step == 7
    np.testing.assert_array_equal(logged, pixels)
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8"):
        log_image(trainer, "panel", pixels.astype(np.float32), step=8)


def test_gpu_configs_log_to_tensorboard_in_their_run_directory_and_digits_configs_to_csv():
    loggers = {}
    for path in sorted(CONFIGS.rglob("*.yaml")):
        trainer = (yaml.safe_load(path.read_text()) or {}).get("trainer") or {}
        if "default_root_dir" in trainer and "logger" in trainer:
            loggers[path.relative_to(CONFIGS)] = (trainer["accelerator"], trainer["default_root_dir"], trainer["logger"])
    assert len(loggers) >= 25
    for path, (accelerator, root, logger) in loggers.items():
        expected = "TensorBoardLogger" if accelerator == "gpu" else "CSVLogger"
        assert logger["class_path"] == f"lightning.pytorch.loggers.{expected}", path
        assert f"{logger['init_args']['save_dir']}/{logger['init_args']['name']}" == root, path


def test_a_tensorboard_logger_without_tensorboard_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setattr(fabric_tensorboard, "_TENSORBOARD_AVAILABLE", False)
    monkeypatch.setattr(fabric_tensorboard, "_TENSORBOARDX_AVAILABLE", False)
    with pytest.raises(ValueError) as error:
        run(["fit", "--config", str(CONFIGS / "quickstart.yaml"), "--trainer.logger",
             "lightning.pytorch.loggers.TensorBoardLogger", "--trainer.logger.save_dir", str(tmp_path),
             "--trainer.default_root_dir", str(tmp_path)], exit_on_error=False)
    assert report(error.value, "fit") == [
        "maskdiff: error: the logger lightning.pytorch.loggers.TensorBoardLogger needs tensorboard, which is not installed",
        "hint: pip install 'maskdiff[tensorboard]' (or log to CSV files: --trainer.logger "
        "lightning.pytorch.loggers.CSVLogger)"]
