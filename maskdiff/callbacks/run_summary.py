"""Print where a run's checkpoint, sample grid and logs are when fitting ends."""

from __future__ import annotations

import time

import lightning as L
from lightning.pytorch.utilities import rank_zero_only

from maskdiff.callbacks.sample_grid import SampleGrid


class RunSummary(L.Callback):
    """At the end of ``fit`` prints wall time, final losses, and the paths of the checkpoint, grid and logs."""

    def __init__(self) -> None:
        self.started = 0.0

    def on_fit_start(self, trainer, pl_module) -> None:
        self.started = time.perf_counter()

    def on_fit_end(self, trainer, pl_module) -> None:
        self._print(trainer, trainer.log_dir or trainer.default_root_dir)  # log_dir broadcasts: read on every rank

    @rank_zero_only
    def _print(self, trainer, log_dir: str) -> None:
        checkpoint = trainer.checkpoint_callback
        ckpt = (checkpoint.last_model_path or checkpoint.best_model_path) if checkpoint is not None else None
        grids = [cb.last_path for cb in trainer.callbacks if isinstance(cb, SampleGrid) and cb.last_path]
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.endswith("loss") or k.startswith("eval/")}
        lines = [
            f"maskdiff: fit finished in {time.perf_counter() - self.started:.1f}s after {trainer.global_step} steps",
            *(f"  {k}: {v:.4f}" for k, v in sorted(metrics.items())),
            f"  checkpoint: {ckpt or '(none saved)'}",
            *(f"  sample grid: {g}" for g in grids),
            f"  logs: {log_dir}",
        ]
        print("\n".join(lines), flush=True)
