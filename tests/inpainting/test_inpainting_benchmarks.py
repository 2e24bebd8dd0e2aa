"""Smoke runs of benchmarks/digits_inpainting.py and benchmarks/moving_digits_inpainting.py on tiny untrained models."""

import json
import runpy
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from maskdiff.backbones import create_backbone
from maskdiff.backbones.mae import MAE_SIZES
from maskdiff.methods.checkpoints import write_method_checkpoint
from maskdiff.inpainting.panels import TITLE_HEIGHT
from maskdiff.methods import MAE
from tests.helpers import ROOT
from tests.inpainting.test_video_inpaint import (
    IMAGE_BACKBONE,
    TILE,
    VIDEO_BACKBONE,
    diffmae_checkpoint,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def run_benchmark(name: str, args: list[str], monkeypatch, capsys) -> str:
    monkeypatch.setattr(sys, "argv", [name, *args])
    runpy.run_path(str(ROOT / "benchmarks" / name), run_name="__main__")
    return capsys.readouterr().out


def test_digits_inpainting_benchmark_scores_every_row_on_the_same_masks(tmp_path, monkeypatch, capsys):
    torch.manual_seed(0)
    mae = MAE(backbone=create_backbone("mae_nano"))
    backbone = {"class_path": "maskdiff.backbones.MAE", "init_args": MAE_SIZES["mae_nano"]}
    mae_ckpt = write_method_checkpoint(tmp_path / "mae.ckpt", "maskdiff.methods.MAE", {"backbone": backbone}, mae.state_dict())
    diffmae_ckpt = diffmae_checkpoint(tmp_path / "diffmae.ckpt", IMAGE_BACKBONE, tube=False)[0]
    out = tmp_path / "digits"
    printed = run_benchmark("digits_inpainting.py", ["--mae", str(mae_ckpt), "--diffmae", str(diffmae_ckpt), "--steps", "2",
                                                     "--samples", "2", "--num_images", "24", "--panel_digits", "3",
                                                     "--out", str(out)], monkeypatch, capsys)
    assert "| MAE (one decoder pass) |" in printed
    report = json.loads(out.with_suffix(".json").read_text())
    rows = {row["row"]: row for row in report["rows"]}
    assert report["protocol"]["num_images"] == 24 and len(rows) == 7
    real = rows["reference: the real digits (nothing hidden)"]
    assert real["masked_mse"] == 0.0
    assert rows["baseline: hidden pixels = background (-1)"]["masked_mse"] > 0.05
    assert rows["DiffMAE, mean of 2 samples"]["masked_mse"] <= rows["DiffMAE (DDPM-2, one sample)"]["masked_mse"]
    assert all(0.0 <= row["class_consistency"] <= 1.0 for row in rows.values())
    assert Image.open(out.with_suffix(".png")).size[1] == TITLE_HEIGHT + 3 * TILE + 1  # column titles, three digits


def test_moving_digits_inpainting_benchmark_scores_every_frame(tmp_path, monkeypatch, capsys):
    ckpt = diffmae_checkpoint(tmp_path / "video.ckpt", VIDEO_BACKBONE, tube=True)[0]
    out = tmp_path / "video"
    printed = run_benchmark("moving_digits_inpainting.py", ["--diffmae", str(ckpt), "--num_clips", "6", "--steps", "2",
                                                            "--canvas", "8", "--glyph_size", "4", "--mask_ratio", "0.5",
                                                            "--out", str(out)], monkeypatch, capsys)
    assert "| frame |" in printed
    report = json.loads(out.with_suffix(".json").read_text())
    rows = {row["row"].split(" (")[0]: row for row in report["rows"]}
    assert len(rows["DiffMAE"]["per_frame"]) == 4
    assert rows["reference: the real clips"]["masked_mse"] == 0.0
    assert rows["DiffMAE"]["masked_mse"] > 0.0
    strip = np.array(Image.open(out.with_suffix(".png")))
    assert strip.shape[0] == 4 * TILE + 1  # original, masked, DiffMAE, DiffMAE 1 step
    with pytest.raises(ValueError, match=r"--diffmae must be a video model on 32-px frames"):
        run_benchmark("moving_digits_inpainting.py", ["--diffmae", str(ckpt), "--out", str(out)], monkeypatch, capsys)
