"""The quickstart config, shortened: its loss falls and it writes the grid and prints where things are."""

import csv

import pytest
from PIL import Image

from maskdiff.images import label_width
from maskdiff.tools.main import main
from tests.helpers import CONFIGS, FAST_GRID, config_in


@pytest.mark.slow
def test_quickstart_loss_falls(tmp_path, digits_cache, capsys):
    config, ckpt_dir = config_in(tmp_path, CONFIGS / "quickstart.yaml", grid=FAST_GRID)
    main(["fit", "--config", str(config), "--trainer.max_steps", "300", "--trainer.log_every_n_steps", "10",
          "--model.init_args.lr_scheduler.init_args.total_steps", "300"])
    metrics_file = next((tmp_path / "logs").rglob("metrics.csv"))
    losses = [float(row["train/loss"]) for row in csv.DictReader(metrics_file.open()) if row.get("train/loss")]
    assert len(losses) == 30
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.5 * first, (first, last)

    printed = capsys.readouterr().out
    assert f"checkpoint: {ckpt_dir / 'last.ckpt'}" in printed
    grid_path = next((tmp_path / "logs").rglob("final.png"))
    assert f"sample grid: {grid_path}" in printed
    # one row per class (10) labelled with its digit, FAST_GRID's 1 sample per row, 16x16 shown at 64x64, 1-px padding
    assert Image.open(grid_path).size == (label_width([str(digit) for digit in range(10)]) + 1 * 65 + 1, 10 * 65 + 1)
    assert "eval/digits_fd:" in printed and "eval/class_consistency:" in printed
