"""``maskdiff plot``: the curves of one or more runs in one PNG, one panel per quantity they logged.

A run's metrics come from its CSVLogger files (``metrics.csv``) and its TensorBoard event files
(``events.out.tfevents.*``, read when ``tensorboard`` is installed), found anywhere under the run directory: a run
directory such as ``runs/quickstart`` holds ``version_0/``, ``version_1/`` (a resumed run) and so on, read in order,
a later value at the same step replacing an earlier one.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from jsonargparse import ArgumentParser

from maskdiff.errors import UserError
from maskdiff.files import write_bytes

Series = dict[str, list[tuple[int, float]]]  # metric key -> [(step, value)] in step order

CSV_NAME = "metrics.csv"
EVENTS_PATTERN = "events.out.tfevents.*"
PANELS_PER_ROW = 3


@dataclass(frozen=True)
class Panel:
    """One panel of the figure: the logged keys it draws (``keys`` exactly, or those starting with ``prefix``)."""

    title: str
    keys: tuple[str, ...] = ()
    prefix: str | None = None
    log_scale: bool = False

    def drawn(self, available: set[str]) -> list[str]:
        """The keys of ``available`` this panel draws, in its order."""
        if self.prefix is not None:
            return sorted(key for key in available if key.startswith(self.prefix))
        return [key for key in self.keys if key in available]


PANELS = (
    Panel("loss", ("train/loss", "val/loss"), log_scale=True),
    Panel("learning rate (LearningRateMonitor)", prefix="lr-"),
    Panel("FID (GenerativeMetrics)", ("eval/fid",)),
    Panel("Inception score (GenerativeMetrics)", ("eval/is",)),
    Panel("digits Fréchet distance (DigitsEvaluation)", ("eval/digits_fd",)),
    Panel("class consistency (DigitsEvaluation)", ("eval/class_consistency",)),
    Panel("online linear probe accuracy", ("probe/top1", "probe/top5")),
    Panel("fine-tuning accuracy", ("val/top1", "val/top5")),
)


def natural_key(path: Path) -> list[int | str]:
    """Sort key putting ``version_2`` before ``version_10``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]


def read_csv_metrics(path: Path) -> Series:
    """``{key: [(step, value)]}`` of one CSVLogger ``metrics.csv`` (its rows are sparse: a blank cell was not
    logged at that step)."""
    series: Series = {}
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            if not row.get("step"):
                continue
            step = int(float(row["step"]))
            for key, cell in row.items():
                if key not in ("step", "epoch") and cell not in ("", None):
                    series.setdefault(key, []).append((step, float(cell)))
    return series


def tensorboard_installed() -> bool:
    """Whether the optional ``tensorboard`` package (``maskdiff[tensorboard]``) can be imported."""
    return importlib.util.find_spec("tensorboard") is not None


def read_event_files(folder: Path) -> Series:
    """``{key: [(step, value)]}`` of the scalars in the TensorBoard event files directly in ``folder`` (needs
    :func:`tensorboard_installed`)."""
    from tensorboard.backend.event_processing import event_accumulator  # the optional dependency

    accumulator = event_accumulator.EventAccumulator(str(folder), size_guidance={event_accumulator.SCALARS: 0})
    accumulator.Reload()
    return {tag: [(event.step, float(event.value)) for event in accumulator.Scalars(tag)]
            for tag in accumulator.Tags()["scalars"]}


def merge(into: dict[str, dict[int, float]], series: Series) -> None:
    """Add ``series`` to ``into`` (key -> step -> value), a later value at a step replacing an earlier one."""
    for key, points in series.items():
        into.setdefault(key, {}).update(points)


def metric_sources(run_dir: Path) -> tuple[list[Path], list[Path]]:
    """``(metrics.csv files, folders of TensorBoard event files)`` under ``run_dir``, in natural path order."""
    csv_files = sorted(run_dir.rglob(CSV_NAME), key=natural_key)
    event_folders = sorted({path.parent for path in run_dir.rglob(EVENTS_PATTERN)}, key=natural_key)
    return csv_files, event_folders


def read_run(run_dir: str | Path) -> Series:
    """Every metric logged under ``run_dir``: ``{key: [(step, value)]}`` in step order, from its ``metrics.csv``
    files and, when ``tensorboard`` is installed, its event files (in natural path order, so ``version_1`` after
    ``version_0``). A run with event files only needs ``tensorboard``; one with neither is refused."""
    run_dir = Path(run_dir)
    csv_files, event_folders = metric_sources(run_dir)
    if not csv_files and not event_folders:
        raise UserError(f"{run_dir} holds no metrics: no {CSV_NAME} (CSVLogger) and no TensorBoard event files",
                        hint="give a run's directory, e.g. runs/quickstart (the logger's save_dir/name)")
    read_events = bool(event_folders) and tensorboard_installed()
    if event_folders and not read_events:
        if not csv_files:
            raise UserError(f"{run_dir} holds TensorBoard event files only, and tensorboard is not installed",
                            hint="pip install 'maskdiff[tensorboard]'")
        print(f"note: {run_dir}: TensorBoard event files skipped (tensorboard is not installed); plotting "
              f"{CSV_NAME} only", file=sys.stderr)
    merged: dict[str, dict[int, float]] = {}
    sources = [(path, read_csv_metrics) for path in csv_files]
    if read_events:
        sources += [(folder, read_event_files) for folder in event_folders]
    for path, read in sorted(sources, key=lambda source: natural_key(source[0])):
        merge(merged, read(path))
    return {key: sorted(points.items()) for key, points in merged.items()}


def run_names(run_dirs: list[Path]) -> list[str]:
    """A legend label per run: its directory's name, or the path as given where two names are alike."""
    names = [path.resolve().name for path in run_dirs]
    return [name if names.count(name) == 1 else str(path) for name, path in zip(names, run_dirs)]


def draw(runs: dict[str, Series], out: str | Path) -> Path:
    """Write ``runs`` (run name -> its series) as one PNG: a panel per :data:`PANELS` entry some run logged, a line
    per run (one colour each) and key (one line style each); atomically."""
    try:
        import matplotlib
    except ImportError as error:
        raise UserError("maskdiff plot draws with matplotlib, which is not installed",
                        hint="pip install 'maskdiff[plot]'") from error
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    available = {key for series in runs.values() for key in series}
    panels = [(panel, panel.drawn(available)) for panel in PANELS]
    panels = [(panel, keys) for panel, keys in panels if keys]
    if not panels:
        logged = ", ".join(sorted(available)[:8]) + (", ..." if len(available) > 8 else "")
        raise UserError(f"none of the plotted quantities was logged (logged: {logged})",
                        hint="plotted: train/loss, val/loss, lr-*, eval/fid, eval/is, eval/digits_fd, "
                             "eval/class_consistency, probe/top1, probe/top5, val/top1, val/top5")
    columns = min(PANELS_PER_ROW, len(panels))
    rows = math.ceil(len(panels) / columns)
    figure, axes = plt.subplots(rows, columns, squeeze=False, figsize=(4.6 * columns, 3.3 * rows))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = ("-", "--", ":", "-.")
    for axis, (panel, keys) in zip(axes.flat, panels):
        for run_index, (name, series) in enumerate(runs.items()):
            for key_index, key in enumerate(keys):
                if key not in series:
                    continue
                steps, values = zip(*series[key])
                label = name if len(keys) == 1 else f"{name}: {key}"
                axis.plot(steps, values, styles[key_index % len(styles)], color=colours[run_index % len(colours)],
                          label=label, marker="o" if len(steps) <= 20 else None, markersize=3, linewidth=1.2)
        if panel.log_scale and all(value > 0 for series in runs.values() for key in keys
                                   for _, value in series.get(key, [])):
            axis.set_yscale("log")
        axis.set_title(panel.title, fontsize=10)
        axis.set_xlabel("step", fontsize=8)
        axis.tick_params(labelsize=8)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    for axis in list(axes.flat)[len(panels):]:
        axis.axis("off")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    return write_bytes(out, buffer.getvalue())


def plot(runs: list[str], out: str = "runs.png") -> str:
    """Draw the logged curves of runs into one PNG, a panel per quantity and a line per run.

        maskdiff plot runs/quickstart runs/mdt_digits --out runs.png

    Args:
        runs: run directories (e.g. ``runs/quickstart``: the logger's ``save_dir/name``), each holding CSVLogger
            ``metrics.csv`` files or TensorBoard event files (``pip install 'maskdiff[tensorboard]'``).
        out: the PNG to write.

    The panels: loss (``train/loss``, ``val/loss``), learning rates (``lr-*``), ``eval/fid``, ``eval/is``,
    ``eval/digits_fd``, ``eval/class_consistency``, probe accuracy (``probe/top1``, ``probe/top5``) and fine-tuning
    accuracy (``val/top1``, ``val/top5``); a panel nobody logged is left out.
    """
    if Path(out).suffix.lower() != ".png":
        raise ValueError(f"--out {out} must end in .png")
    run_dirs = [Path(run).expanduser() for run in runs]
    for run_dir in run_dirs:
        if not run_dir.exists():
            raise FileNotFoundError(f"run directory not found: {run_dir}")
        if not run_dir.is_dir():
            raise NotADirectoryError(f"run directory {run_dir} is not a directory")
    series = {name: read_run(run_dir) for name, run_dir in zip(run_names(run_dirs), run_dirs)}
    path = draw(series, out)
    read = []
    for name, run_dir in zip(series, run_dirs):
        csv_files, event_folders = metric_sources(run_dir)
        read.append(f"{name} ({len(csv_files)} {CSV_NAME}, {len(event_folders)} TensorBoard folder(s))")
    print(f"wrote {path}: {'; '.join(read)}")
    return str(path)


def plot_command(args: list[str], exit_on_error: bool = True) -> None:
    """``maskdiff plot RUN_DIR [RUN_DIR ...] [--out runs.png]`` (``exit_on_error=False``: a command line that does
    not parse raises jsonargparse's ``ArgumentError``)."""
    lines = [line.strip() for line in (plot.__doc__ or "").splitlines()]
    example = next(line for line in lines if line.startswith("maskdiff "))
    parser = ArgumentParser(prog="maskdiff plot", description=f"{lines[0]} Example: {example}",
                            exit_on_error=exit_on_error)
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR",
                        help="run directories (the logger's save_dir/name, e.g. runs/quickstart)")
    parser.add_argument("--out", default="runs.png", help="the PNG to write")
    parsed = parser.parse_args(args)
    plot(parsed.runs, parsed.out)
