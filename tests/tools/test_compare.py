"""``maskdiff compare`` end to end in its quick setting: all five methods, every axis, a tiny budget."""

from __future__ import annotations

import json
import math

import pytest
import torch
from PIL import Image

from maskdiff.comparison.axes import hidden_psnr, selection_split
from maskdiff.comparison.report import columns
from maskdiff.errors import UserError
from maskdiff.tools.main import main
from tests.helpers import CONFIGS

METHODS = ["DiT", "MDT", "MAE", "DiffMAE", "UMD"]
GENERATORS = {"DiT", "MDT", "UMD"}
ACCURACIES = ("class_consistency", "linear_top1", "few_shot_top1", "finetune_top1")


def table_rows(markdown: str) -> list[list[str]]:
    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]


@pytest.mark.slow
def test_quick_comparison_of_all_five_methods(tmp_path, digits_cache, one_thread):
    out = tmp_path / "compare"
    main(["compare", "--config", str(CONFIGS / "compare" / "digits.yaml"), "--config",
          str(CONFIGS / "compare" / "quick.yaml"), "--out", str(out)])

    for name in ("compare.md", "compare.json", "compare.png", "inpainting.png"):
        assert (out / name).is_file(), name
    record = json.loads((out / "compare.json").read_text())
    assert list(record["methods"]) == METHODS
    assert record["settings"]["pretrain"]["steps"] == 6 and record["machine"]["cpus"] >= 1 and record["date"]
    expected = [column.key for column in columns(["box", "half", "random"], 2)]
    for method, result in record["methods"].items():
        figures = result["figures"]
        assert sorted(figures) == sorted(expected), method
        for key, value in figures.items():
            if value is None:
                assert method not in GENERATORS and key in ("digits_fd", "class_consistency", "sample_s_per_image")
                assert "MAE" in result["not_applicable"][key]
                continue
            assert math.isfinite(value), (method, key)
            if key in ACCURACIES:
                assert 0.0 <= value <= 1.0, (method, key, value)
            elif key.endswith("_psnr"):
                assert value > 0, (method, key, value)
            elif key.endswith("_fd"):
                assert value >= 0, (method, key, value)
            else:
                assert value > 0, (method, key, value)
        assert (method in GENERATORS) == (figures["digits_fd"] is not None)
        assert (out / method / "pretrain" / "checkpoints" / "last.ckpt").is_file()
    assert record["methods"]["UMD"]["generation"]["route"] == "finetune"
    assert record["methods"]["DiT"]["representation"]["timestep"] in (0, 50)
    assert record["methods"]["MAE"]["inpainting"]["mode"] == "reconstruct"
    assert record["methods"]["DiffMAE"]["inpainting"]["mode"] == "hidden_chain"

    rows = table_rows((out / "compare.md").read_text())
    assert len(rows) == 2 + 5 and [row[0] for row in rows[2:]] == METHODS
    assert len(rows[0]) == len(expected) + 2 and all(len(row) == len(rows[0]) for row in rows)
    assert rows[2 + METHODS.index("MAE")][1].startswith("—")
    with Image.open(out / "inpainting.png") as panel:
        assert panel.height > 7 * 64  # original, masked and a row per method, upscaled tiles
    with Image.open(out / "compare.png") as plot:
        assert plot.width > 400


def test_hidden_psnr_counts_only_hidden_pixels():
    original = torch.zeros(2, 1, 4, 4)
    completed = original.clone()
    mask = torch.zeros(2, 1, 4, 4, dtype=torch.bool)
    mask[:, :, :2] = True
    completed[:, :, 2:] = 1.0  # errors in the visible half do not count
    completed[0, :, :2] = 0.5  # error 0.25 on the hidden half of image 0 -> 10 log10(4 / 0.25)
    assert hidden_psnr(completed, original, mask) == pytest.approx((10 * math.log10(16) + 100) / 2)


def test_selection_split_is_seeded_and_disjoint():
    fit, held = selection_split(50, 0.2, seed=3)
    again, _ = selection_split(50, 0.2, seed=3)
    assert len(held) == 10 and torch.equal(fit, again)
    assert sorted(torch.cat([fit, held]).tolist()) == list(range(50))
    with pytest.raises(ValueError, match="selection_fraction"):
        selection_split(50, 1.0, seed=0)


def test_compare_refuses_a_missing_method_config_before_training(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("methods:\n  DiT: {config: configs/nowhere.yaml, generation: native}\n")
    with pytest.raises(FileNotFoundError, match="nowhere.yaml"):
        main(["compare", "--config", str(config), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_compare_needs_a_reason_for_a_method_it_does_not_judge_as_a_generator(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("methods:\n  MAE: {config: configs/mae/mae_digits.yaml, generation: none}\n")
    with pytest.raises(UserError, match="no_generation"):
        main(["compare", "--config", str(config), "--out", str(tmp_path / "out")])


def test_compare_refuses_an_out_folder_holding_an_earlier_comparison(tmp_path):
    (tmp_path / "out" / "MAE" / "pretrain" / "checkpoints").mkdir(parents=True)
    (tmp_path / "out" / "MAE" / "pretrain" / "checkpoints" / "last.ckpt").write_bytes(b"")
    config = tmp_path / "one.yaml"
    config.write_text("methods:\n  MAE: {config: configs/mae/mae_digits.yaml, no_generation: not a generator}\n")
    with pytest.raises(UserError, match="earlier comparison"):
        main(["compare", "--config", str(config), "--out", str(tmp_path / "out")])
