"""The outputs of a comparison: ``compare.md`` (one row per method, "—" with a footnote where an axis does not
apply), ``compare.json`` (every figure with the settings, commit, date and machine), ``compare.png`` (one panel per
axis, methods side by side) and the inpainting panel; every file written atomically."""

from __future__ import annotations

import io
import math
import os
import platform
import subprocess
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from maskdiff.errors import UserError
from maskdiff.files import write_bytes, write_json, write_text
from maskdiff.inpainting.panels import save_panel, upscale

MASK_NAMES = {"box": "centre box", "half": "half", "random": "random"}


@dataclass(frozen=True)
class Column:
    """A figure of the table: ``key`` in a method's figures, its header, its format and the axis it belongs to."""

    key: str
    header: str
    digits: int
    axis: str


def columns(masks: list[str], shots: int) -> list[Column]:
    """The table's columns for the inpainting ``masks`` and the few-shot probe's ``shots``."""
    found = [Column("digits_fd", "digits FD ↓", 2, "generation: digits FD ↓"),
             Column("class_consistency", "class consistency ↑", 3, "generation: class consistency ↑")]
    for kind in masks:
        found += [Column(f"inpaint_{kind}_psnr", f"{MASK_NAMES[kind]} PSNR ↑", 2, "inpainting PSNR (dB)"),
                  Column(f"inpaint_{kind}_fd", f"{MASK_NAMES[kind]} FD ↓", 2, "inpainting digits FD")]
    found += [Column("linear_top1", "linear probe ↑", 3, "representation (top-1)"),
              Column("few_shot_top1", f"{shots}-shot ↑", 3, "representation (top-1)"),
              Column("finetune_top1", "fine-tune ↑", 3, "representation (top-1)"),
              Column("train_images_per_s", "train images/s ↑", 0, "training images/s"),
              Column("params_m", "params (M)", 3, "parameters (M)"),
              Column("sample_s_per_image", "sample s/img ↓", 4, "seconds per image"),
              Column("inpaint_s_per_image", "inpaint s/img ↓", 4, "seconds per image")]
    return found


def cell(value: float | None, digits: int) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def markdown_table(rows: dict[str, dict[str, Any]], reasons: dict[str, dict[str, str]], table_columns: list[Column],
                   title: str, notes: list[str]) -> str:
    """``rows``: method -> figures (``None`` where the axis does not apply, ``reasons[method][key]`` says why) plus
    ``feature`` (the probed feature) -> the markdown page: title, table, footnotes, notes."""
    footnotes: list[str] = []
    header = ["method", *[column.header for column in table_columns], "probed feature"]
    lines = [f"# {title}", "", "| " + " | ".join(header) + " |", "|---|" + "---:|" * len(table_columns) + "---|"]
    for method, figures in rows.items():
        cells = [method]
        for column in table_columns:
            text = cell(figures.get(column.key), column.digits)
            reason = reasons.get(method, {}).get(column.key)
            if figures.get(column.key) is None and reason:
                if reason not in footnotes:
                    footnotes.append(reason)
                text += f" [{footnotes.index(reason) + 1}]"
            cells.append(text)
        cells.append(str(figures.get("feature", "")))
        lines.append("| " + " | ".join(cells) + " |")
    lines += [""] + [f"[{index}] {reason}" for index, reason in enumerate(footnotes, 1)]
    return "\n".join(lines + [""] + notes) + "\n"


def commit_hash(root: Path) -> str | None:
    """The repository's HEAD commit (with ``+dirty`` when the tree has changes), or ``None`` outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty else "")


def machine() -> dict[str, Any]:
    return {"host": platform.node(), "platform": platform.platform(), "processor": platform.machine(),
            "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def run_record(settings: dict[str, Any], results: dict[str, Any], commit: str | None, wall_s: float) -> dict[str, Any]:
    """What ``compare.json`` holds: the settings, every method's figures and details, the commit the run started
    from (:func:`commit_hash` taken before the first step), and where it ran."""
    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "commit": commit,
            "machine": machine(), "wall_s": round(wall_s, 1), "settings": settings, "methods": results}


def check_plotting() -> None:
    """Fail before any training when matplotlib is missing (``compare.png`` needs it)."""
    try:
        import matplotlib  # noqa: F401 -- an optional dependency, checked here once
    except ImportError as error:
        raise UserError("maskdiff compare draws compare.png with matplotlib, which is not installed",
                        hint="pip install 'maskdiff[plot]'") from error


def plot(rows: dict[str, dict[str, Any]], table_columns: list[Column], path: Path) -> Path:
    """``compare.png``: one bar panel per axis, one bar group per method (a figure per bar colour), "—" where a
    method has none; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axes_of: dict[str, list[Column]] = {}
    for column in table_columns:
        axes_of.setdefault(column.axis, []).append(column)
    methods = list(rows)
    width_per_axis = 4.2
    per_row = 4
    count = len(axes_of)
    figure, grid = plt.subplots(math.ceil(count / per_row), per_row, squeeze=False,
                                figsize=(width_per_axis * per_row, 3.4 * math.ceil(count / per_row)))
    for axis, (name, group) in zip(grid.flat, axes_of.items()):
        width = 0.8 / len(group)
        for index, column in enumerate(group):
            xs = [m + (index - (len(group) - 1) / 2) * width for m in range(len(methods))]
            values = [rows[method].get(column.key) for method in methods]
            axis.bar([x for x, v in zip(xs, values) if v is not None], [v for v in values if v is not None], width,
                     label=column.header)
            for x, value in zip(xs, values):
                if value is None:
                    axis.text(x, 0, "—", ha="center", va="bottom")
        axis.set_xticks(range(len(methods)), methods, fontsize=8)
        axis.set_title(name, fontsize=9)
        axis.grid(axis="y", alpha=0.3)
        if len(group) > 1:
            axis.legend(fontsize=7)
    for axis in list(grid.flat)[count:]:
        axis.axis("off")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    return write_bytes(path, buffer.getvalue())


def inpainting_panel(originals: torch.Tensor, masked: torch.Tensor, completed: dict[str, torch.Tensor],
                     path: Path) -> Path:
    """One labelled row each for the original digits, the masked inputs (hidden pixels grey) and every method's
    completions ``(K, C, H, W)``."""
    rows = [("original", upscale(originals)), ("masked", upscale(masked))]
    rows += [(method, upscale(images)) for method, images in completed.items()]
    return save_panel(rows, path, per_row=len(originals))


def write_outputs(out: Path, markdown: str, record: dict[str, Any], rows: dict[str, dict[str, Any]],
                  table_columns: list[Column]) -> list[Path]:
    """``compare.md``, ``compare.json`` and ``compare.png`` under ``out``."""
    return [write_text(out / "compare.md", markdown), write_json(out / "compare.json", record),
            plot(rows, table_columns, out / "compare.png")]
