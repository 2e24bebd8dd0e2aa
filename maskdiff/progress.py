"""Progress bars for long work: one tqdm bar, shown on rank 0 only, off when stderr is not a terminal.

``MASKDIFF_PROGRESS=1`` forces bars on (e.g. under a SLURM log you tail), ``MASKDIFF_PROGRESS=0`` turns them off;
a command's own ``--progress false`` does the same for that command.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import Any

from tqdm.auto import tqdm

ENV = "MASKDIFF_PROGRESS"


def process_rank() -> int:
    """This process's global rank under torchrun/srun/Lightning (0 when not distributed)."""
    for name in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        value = os.environ.get(name)
        if value is not None and value.strip().isdigit():
            return int(value)
    return 0


def progress_enabled(requested: bool | None = None) -> bool:
    """Whether to draw a bar: never on a rank other than 0; else ``requested`` when given (``--progress true|false``),
    then ``MASKDIFF_PROGRESS``, then "stderr is a terminal"."""
    if requested is False or process_rank() != 0:
        return False
    if requested is True:
        return True
    forced = os.environ.get(ENV, "").strip().lower()
    if forced in ("0", "false", "no", "off"):
        return False
    if forced in ("1", "true", "yes", "on"):
        return True
    return bool(sys.stderr.isatty())


def progress(iterable: Iterable | None = None, *, desc: str, total: int | None = None, unit: str = "it",
             enabled: bool | None = None, **kwargs: Any) -> tqdm:
    """A ``tqdm`` over ``iterable`` (or a manual bar when ``iterable`` is None: call ``.update(n)``), drawn only
    where :func:`progress_enabled` ``(enabled)`` says so; disabled bars cost nothing and print nothing."""
    return tqdm(iterable, desc=desc, total=total, unit=unit, disable=not progress_enabled(enabled),
                dynamic_ncols=True, **kwargs)


def sampling_progress(total_steps: int, desc: str = "sampling", enabled: bool | None = None):
    """``(bar, callback)``: a bar of ``total_steps`` sampling steps and the sampler ``callback(step, x, output)``
    that advances it (pass it to ``Generation.generate(callback=...)``); close the bar when sampling ends."""
    bar = progress(desc=desc, total=total_steps, unit="step", enabled=enabled)

    def advance(step: int, x: Any, output: Any) -> None:
        bar.update(1)

    return bar, advance
