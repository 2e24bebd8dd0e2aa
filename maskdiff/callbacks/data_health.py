"""Log how many samples the data module decoded and skipped, summed over ranks, and print why samples were skipped."""

from __future__ import annotations

import collections

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn

from maskdiff.data import ShardsDataModule

EXAMPLES = 3


class DataHealth(L.Callback):
    """Logs ``data/read`` and ``data/skipped`` at every training epoch end and at fit end; prints skip reasons.

    The counts are a :class:`~maskdiff.data.ShardsDataModule`'s ``samples_read`` and ``skipped``:
    cumulative since the data module was built, over its training and evaluation streams and all
    DataLoader workers, summed over ranks (every rank takes part in one all-reduce of two integers).
    Whenever the skip total grew since the last report, and at the end of ``fit``, ``validate`` and ``test``,
    rank 0 prints the totals and one line per reason (the ``top_k`` most frequent, gathered from all ranks)
    with its count and a few example keys or shard names::

        maskdiff: data read 1,203 samples, skipped 17 (1.39%)
                16  shard unreadable or cut short (ReadError: unexpected end of data)   e.g. d-000003.tar
                 1  UnidentifiedImageError: cannot identify image file                 e.g. n01440764_1001

    Epoch-end values go through ``LightningModule.log`` (float32: exact up to 16,777,216 samples);
    end-of-run values are written to the loggers as integers.

    Args:
        top_k: reasons printed (most frequent first).
    """

    def __init__(self, top_k: int = 5):
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k!r}")
        self.top_k = top_k
        self._reported_skips = 0

    @staticmethod
    def _datamodule(trainer) -> ShardsDataModule | None:
        datamodule = trainer.datamodule
        return datamodule if isinstance(datamodule, ShardsDataModule) else None

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._reported_skips = 0
        if self._datamodule(trainer) is None:
            rank_zero_warn(
                "DataHealth: the datamodule does not count samples (a maskdiff.data.ShardsDataModule does; got "
                f"{type(trainer.datamodule).__name__}): nothing will be logged"
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
        self._summary(trainer, pl_module)

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.state.fn == TrainerFn.VALIDATING:
            self._summary(trainer, pl_module)

    def on_test_end(self, trainer, pl_module) -> None:
        self._summary(trainer, pl_module)

    def _summary(self, trainer, pl_module) -> None:
        """Write the totals to the loggers and print them with the reasons (a collective when distributed)."""
        if self._datamodule(trainer) is None:
            return
        read, skipped = self.totals(trainer, pl_module)
        for logger in trainer.loggers:
            logger.log_metrics({"data/read": read, "data/skipped": skipped}, step=trainer.global_step)
            logger.save()
        self._report(trainer, read, skipped)

    def _report(self, trainer, read: int, skipped: int) -> None:
        reasons, examples = self._gather_reasons(trainer)
        self._reported_skips = skipped
        if not trainer.is_global_zero:
            return
        print("\n".join(self.summary_lines(read, skipped, reasons, examples)), flush=True)

    def summary_lines(self, read: int, skipped: int, reasons: collections.Counter,
                      examples: dict[str, list[str]]) -> list[str]:
        """The printed summary: the totals, then one line per reason (``top_k``) with its count and examples."""
        share = skipped / max(read + skipped, 1)
        lines = [f"maskdiff: data read {read:,} samples, skipped {skipped:,} ({share:.2%})"]
        top = reasons.most_common(self.top_k)
        width = max((len(reason) for reason, _ in top), default=0)
        for reason, count in top:
            keys = examples.get(reason, [])
            lines.append(f"  {count:>8,}  {reason:<{width}}" + (f"   e.g. {', '.join(keys)}" if keys else "").rstrip())
        if len(reasons) > self.top_k:
            lines.append(f"  ... and {len(reasons) - self.top_k} more reasons")
        return lines

    def _gather_reasons(self, trainer) -> tuple[collections.Counter, dict[str, list[str]]]:
        """Skip reasons and their example keys of all ranks, merged (a collective when distributed)."""
        datamodule = self._datamodule(trainer)
        local = (dict(datamodule.skip_reasons), datamodule.skip_examples)
        if trainer.world_size == 1 or not (dist.is_available() and dist.is_initialized()):
            gathered = [local]
        else:
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, local)
        reasons: collections.Counter = collections.Counter()
        examples: dict[str, list[str]] = {}
        for rank_reasons, rank_examples in gathered:
            reasons.update(rank_reasons)
            for reason, keys in rank_examples.items():
                known = examples.setdefault(reason, [])
                known += [key for key in keys if key not in known][: max(0, EXAMPLES - len(known))]
        return reasons, examples
