"""Log how many samples the data module decoded and skipped, summed over ranks, and print why samples were skipped."""

from __future__ import annotations

import collections

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_warn

COUNTING_ATTRIBUTES = ("samples_read", "skipped", "skip_reasons")


class DataHealth(L.Callback):
    """Logs ``data/read`` and ``data/skipped`` at every training epoch end and at fit end; prints skip reasons.

    The counts are a :class:`~maskdiff.data.ShardsDataModule`'s ``samples_read`` and ``skipped``:
    cumulative since the data module was built, over its training and evaluation streams and all
    DataLoader workers, summed over ranks (every rank takes part in one all-reduce of two integers).
    Whenever the skip total grew since the last report, and at fit end, rank 0 prints the totals and
    the ``top_k`` most frequent reasons, gathered from all ranks.

    Epoch-end values go through ``LightningModule.log`` (float32: exact up to 16,777,216 samples);
    fit-end values are written to the loggers as integers.

    Args:
        top_k: reasons printed (most frequent first).
    """

    def __init__(self, top_k: int = 5):
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k!r}")
        self.top_k = top_k
        self._reported_skips = 0

    @staticmethod
    def _datamodule(trainer):
        datamodule = getattr(trainer, "datamodule", None)
        return datamodule if all(hasattr(datamodule, name) for name in COUNTING_ATTRIBUTES) else None

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._reported_skips = 0
        if stage == "fit" and self._datamodule(trainer) is None:
            rank_zero_warn(
                "DataHealth: the datamodule does not count samples (it needs samples_read, skipped and "
                f"skip_reasons, as maskdiff.data.ShardsDataModule has; got {type(trainer.datamodule).__name__}): "
                "nothing will be logged"
            )

    def totals(self, trainer, pl_module) -> tuple[int, int]:
        """``(read, skipped)`` summed over ranks; a collective: every rank must call it."""
        datamodule = self._datamodule(trainer)
        counts = torch.tensor([datamodule.samples_read, datamodule.skipped], dtype=torch.int64, device=pl_module.device)
        counts = trainer.strategy.reduce(counts, reduce_op="sum")
        return int(counts[0]), int(counts[1])

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self._datamodule(trainer) is None:
            return
        read, skipped = self.totals(trainer, pl_module)
        pl_module.log("data/read", float(read), on_step=False, on_epoch=True)
        pl_module.log("data/skipped", float(skipped), on_step=False, on_epoch=True)
        if skipped > self._reported_skips:
            self._report(trainer, read, skipped)

    def on_fit_end(self, trainer, pl_module) -> None:
        if self._datamodule(trainer) is None:
            return
        read, skipped = self.totals(trainer, pl_module)
        for logger in trainer.loggers:
            logger.log_metrics({"data/read": read, "data/skipped": skipped}, step=trainer.global_step)
            logger.save()
        self._report(trainer, read, skipped)

    def _report(self, trainer, read: int, skipped: int) -> None:
        reasons = self._gather_reasons(trainer)
        self._reported_skips = skipped
        if not trainer.is_global_zero:
            return
        share = skipped / max(read + skipped, 1)
        lines = [f"maskdiff: data read {read:,} samples, skipped {skipped:,} ({share:.2%})"]
        lines += [f"  {count:>8,}  {reason}" for reason, count in reasons.most_common(self.top_k)]
        if len(reasons) > self.top_k:
            lines.append(f"  ... and {len(reasons) - self.top_k} more reasons")
        print("\n".join(lines), flush=True)

    def _gather_reasons(self, trainer) -> collections.Counter:
        """Skip reasons of all ranks, merged (a collective when distributed)."""
        local = self._datamodule(trainer).skip_reasons
        if trainer.world_size == 1 or not (dist.is_available() and dist.is_initialized()):
            return local
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, dict(local))
        return sum((collections.Counter(reasons) for reasons in gathered), collections.Counter())
