"""``maskdiff plot``: metrics read back exactly from CSVLogger files and TensorBoard event files, one PNG, and a
one-line error for each bad input."""

from __future__ import annotations

import pytest
from PIL import Image
from torch.utils.tensorboard import SummaryWriter

from maskdiff.errors import UserError
from maskdiff.tools import plot as plot_module
from maskdiff.tools.main import main, report
from maskdiff.tools.plot import plot, read_run


def write_csv(path, header: list[str], rows: list[list[object]]) -> None:
    """A CSVLogger-like ``metrics.csv`` (sparse rows: ``""`` = not logged at that step)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(",".join(str(cell) for cell in row) for row in [header, *rows]) + "\n")


@pytest.fixture
def two_runs(tmp_path):
    """``runs/a``: loss, learning rate and digits metrics over two versions (a resumed run); ``runs/b``: loss and
    probe accuracy."""
    write_csv(tmp_path / "runs" / "a" / "version_0" / "metrics.csv",
              ["epoch", "step", "lr-AdamW", "train/loss", "eval/digits_fd", "eval/class_consistency"],
              [[0, 0, 0.001, 1.5, "", ""], [0, 9, 0.002, 0.75, "", ""], [0, 10, "", "", 40.0, 0.5],
               [0, 19, 0.002, 0.25, "", ""]])
    write_csv(tmp_path / "runs" / "a" / "version_1" / "metrics.csv", ["epoch", "step", "train/loss"],
              [[1, 19, 0.375], [1, 29, 0.125]])  # resumed at step 19: its value replaces the first run's
    write_csv(tmp_path / "runs" / "b" / "version_0" / "metrics.csv", ["epoch", "step", "train/loss", "probe/top1"],
              [[0, 4, 2.0, ""], [0, 9, "", 0.625]])
    return tmp_path / "runs" / "a", tmp_path / "runs" / "b"


def test_csv_series_are_read_exactly_and_versions_continue(two_runs):
    first, second = two_runs
    assert read_run(first) == {
        "lr-AdamW": [(0, 0.001), (9, 0.002), (19, 0.002)],
        "train/loss": [(0, 1.5), (9, 0.75), (19, 0.375), (29, 0.125)],
        "eval/digits_fd": [(10, 40.0)],
        "eval/class_consistency": [(10, 0.5)],
    }
    assert read_run(second) == {"train/loss": [(4, 2.0)], "probe/top1": [(9, 0.625)]}


def test_tensorboard_event_files_are_read_exactly(tmp_path):
    writer = SummaryWriter(str(tmp_path / "tb" / "version_0"))
    for step, (loss, fid) in enumerate([(1.0, 90.5), (0.5, 60.25)]):
        writer.add_scalar("train/loss", loss, step)
        writer.add_scalar("eval/fid", fid, step * 10)
    writer.close()
    assert read_run(tmp_path / "tb") == {"train/loss": [(0, 1.0), (1, 0.5)], "eval/fid": [(0, 90.5), (10, 60.25)]}


def test_plot_command_draws_every_run_into_one_png(two_runs, tmp_path, capsys):
    out = tmp_path / "plots" / "runs.png"
    main(["plot", *map(str, two_runs), "--out", str(out)])
    assert "a (2 metrics.csv, 0 TensorBoard folder(s)); b (1 metrics.csv" in capsys.readouterr().out
    width, height = Image.open(out).size
    assert width > height > 300  # 5 panels: loss, rate, FD, consistency, probe in 2 rows of 3
    assert not [path for path in out.parent.iterdir() if path != out]  # written atomically: no temporary left


def test_event_files_without_tensorboard_installed(two_runs, tmp_path, monkeypatch, capsys):
    writer = SummaryWriter(str(tmp_path / "tb"))
    writer.add_scalar("train/loss", 1.0, 0)
    writer.close()
    SummaryWriter(str(two_runs[0] / "version_2")).close()
    monkeypatch.setattr(plot_module, "tensorboard_installed", lambda: False)
    with pytest.raises(UserError, match="event files only, and tensorboard is not installed") as error:
        read_run(tmp_path / "tb")
    assert error.value.hint == "pip install 'maskdiff[tensorboard]'"
    assert read_run(two_runs[0])["train/loss"][-1] == (29, 0.125)  # the CSV files alone
    assert "TensorBoard event files skipped" in capsys.readouterr().err


def test_bad_inputs_are_one_line_errors(two_runs, tmp_path):
    out = str(tmp_path / "runs.png")
    with pytest.raises(FileNotFoundError, match="run directory not found: .*missing"):
        plot([str(two_runs[0]), str(tmp_path / "missing")], out)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="empty holds no metrics: no metrics.csv"):
        plot([str(tmp_path / "empty")], out)
    write_csv(tmp_path / "other" / "metrics.csv", ["epoch", "step", "data/read"], [[0, 1, 5]])
    with pytest.raises(UserError, match=r"none of the plotted quantities was logged \(logged: data/read\)"):
        plot([str(tmp_path / "other")], out)
    with pytest.raises(ValueError, match="must end in .png"):
        plot([str(two_runs[0])], str(tmp_path / "runs.jpg"))
    with pytest.raises(SystemExit):
        main(["plot"])
    with pytest.raises(FileNotFoundError) as missing:
        main(["plot", str(tmp_path / "missing")])
    assert report(missing.value, "plot") == [f"maskdiff: error: run directory not found: {tmp_path / 'missing'}"]
