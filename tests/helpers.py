"""Shared helpers for tests that drive the CLI."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
DEBUG_CONFIG = CONFIGS / "dit" / "dit_debug_cpu.yaml"


FAST_GRID = {"per_class": 1, "sampler": {"class_path": "maskdiff.samplers.DDIMSampler", "init_args": {"steps": 3}}}


def config_in(tmp_path: Path, base: Path = DEBUG_CONFIG, grid: dict | None = None) -> tuple[Path, Path]:
    """Copy ``base`` so that checkpoints, logs and samples go under ``tmp_path``; returns (config, checkpoint dir).

    ``grid`` updates the init args of ``SampleGrid`` and ``DigitsEvaluation`` callbacks (:data:`FAST_GRID`: quick).
    """
    ckpt_dir = tmp_path / "checkpoints"
    config = yaml.safe_load(base.read_text())
    trainer = config["trainer"]
    for callback in trainer.get("callbacks", []):
        if callback["class_path"].endswith("ModelCheckpoint"):
            callback["init_args"]["dirpath"] = str(ckpt_dir)
        if grid and callback["class_path"].endswith(("SampleGrid", "DigitsEvaluation")):
            callback["init_args"].update(grid)
    trainer["logger"]["init_args"]["save_dir"] = str(tmp_path / "logs")
    trainer["default_root_dir"] = str(tmp_path)
    trainer["enable_progress_bar"] = False
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path, ckpt_dir


@contextmanager
def single_thread():
    """Run with one torch thread (small tensors on a shared 2-core machine: a second thread only adds contention)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
