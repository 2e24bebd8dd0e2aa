"""The shard DataModule base: resampled streaming training and exactly-once, DDP-balanced evaluation.

Subclasses say how a sample is decoded (:meth:`ShardsDataModule.make_decoder`); images, video clips and
pre-encoded latents share everything else: shard resolution, epoch length, worker/rank splitting, skip
counting and the saved stream position.
"""

from __future__ import annotations

import collections
import logging

import lightning as L
import torch
import webdataset as wds

from .faults import DataFault, SkipCounter
from .loaders import EpochAwareLoader, EvalLoader
from .reading import check_shards_readable, listing, shard_name
from .shards import check_local_shards, expand_urls, lookup_shard_counts
from .streams import EvalStream, ResampledTrainStream, _pass_through, eval_batch_plan

log = logging.getLogger("maskdiff.data")

PASS_NAMES = {"sanity_check": "sanity-check validation", "validate": "validation", "test": "test", "predict": "predict"}


class ShardsDataModule(L.LightningDataModule):
    """Samples with class labels from WebDataset tar shards; subclasses implement :meth:`make_decoder`.

    Training streams without end (:class:`ResampledTrainStream`): each rank and worker draws shards
    with replacement; an epoch is ``train_samples_per_epoch // (world_size * batch_size)`` batches
    per rank (at least 1), which is also ``len(train_dataloader())``.

    Validation, test and predict read ``val_shards`` once (:class:`EvalStream`): every sample exactly
    once over all ranks and workers, and the same number of batches on every rank.

    ``samples_read`` counts samples decoded and ``skipped`` samples skipped because they failed to decode or
    were lost with the rest of a shard cut short (exactly when the manifest lists the shard's count), with their
    ``skip_reasons`` and a few ``skip_examples`` (keys or shard names) of each (see
    :class:`~maskdiff.data.faults.SkipCounter`); with ``num_workers > 0`` they are shared across worker
    processes, and workers log their first skips as warnings on ``maskdiff.data``.
    :class:`~maskdiff.callbacks.DataHealth` logs and prints them.

    ``setup`` checks the shard patterns before any data is read: a pattern expanding to nothing, a missing local
    shard, or local shards that cannot give a sample (unreadable, empty files, not tars, tars without members)
    raise ``ValueError`` naming them; fewer training shards than ranks x workers is a warning (training
    resamples shards, so readers then repeat shards within an epoch). Remote URLs are not checked.

    Faults stop the run with a one-line :class:`~maskdiff.data.faults.DataFault` rather than hang or log NaN:
    training that reads every shard without a sample since the last one, or goes ``stall_timeout`` seconds
    without one (with worker processes, also a batch that takes longer); an evaluation pass (validation, test,
    predict) that reads no sample, naming the split and its shards; more than ``max_errors`` skips. SIGTERM and
    SIGINT stop a run at once while it waits for data (:func:`~maskdiff.data.loaders.stop_on_signal`).

    Checkpoints store ``seed`` and ``epochs_seen``, and the training loader's position (epoch and batches
    trained on). An epoch's stream is a function of ``(seed, epoch)``, so resuming from a checkpoint taken
    mid-epoch replays that epoch and fast-forwards (reads, does not train on) the batches already trained on:
    the resumed run sees exactly the batches the uninterrupted run saw.
    """

    def __init__(
        self,
        train_shards: str,
        val_shards: str | None = None,
        batch_size: int = 64,
        val_batch_size: int | None = None,
        num_workers: int = 2,
        shuffle_buffer: int = 1000,
        train_samples_per_epoch: int | None = None,
        val_samples: int | None = None,
        seed: int = 0,
        max_errors: int | None = None,
        stall_timeout: float | None = 600.0,
    ):
        super().__init__()
        self.train_shards = train_shards
        self.val_shards = val_shards
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size
        self.num_workers = num_workers
        self.shuffle_buffer = shuffle_buffer
        self.train_samples_per_epoch = train_samples_per_epoch
        self.val_samples = val_samples
        self.seed = seed
        self.max_errors = max_errors
        self.stall_timeout = stall_timeout
        self.epochs_seen = 0
        self._counters: dict[str, SkipCounter] = {}
        self._train_urls: list[str] | None = None
        self._train_counts: list[int] | None = None
        self._train_total: int | None = None
        self._val_urls: list[str] | None = None
        self._val_counts: list[int] | None = None
        self._val_total: int | None = None
        ShardsDataModule._check_config(self)  # batch sizes and workers when built, before any data is read

    def make_decoder(self, train: bool):
        """The sample decoder of the training (``train=True``) or evaluation streams (see :mod:`.streams`)."""
        raise NotImplementedError(f"{type(self).__name__} must implement make_decoder(train)")

    @property
    def skipped(self) -> int:
        """Samples skipped so far (train and evaluation; cumulative since construction)."""
        return sum(counter.skipped for counter in self._counters.values())

    @property
    def samples_read(self) -> int:
        """Samples decoded so far (train and evaluation; cumulative since construction)."""
        return sum(counter.read for counter in self._counters.values())

    @property
    def skip_reasons(self) -> collections.Counter:
        """Reasons of skips (of all workers), ``"ExceptionType: message" -> count``."""
        return sum((counter.reasons for counter in self._counters.values()), collections.Counter())

    @property
    def skip_examples(self) -> dict[str, list[str]]:
        """A few keys (or shard names) skipped for each reason of :attr:`skip_reasons`."""
        examples: dict[str, list[str]] = {}
        for counter in self._counters.values():
            for reason, keys in counter.examples.items():
                known = examples.setdefault(reason, [])
                known += [key for key in keys if key not in known]
        return examples

    def _check_config(self) -> None:
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        if self.val_batch_size is not None and self.val_batch_size < 1:
            raise ValueError(f"val_batch_size must be a positive integer, got {self.val_batch_size!r}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers!r}")
        if self.stall_timeout is not None and not self.stall_timeout > 0:
            raise ValueError(f"stall_timeout must be a positive number of seconds or None (no bound), got {self.stall_timeout!r}")

    def _distributed_info(self) -> tuple[int, int]:
        """``(global_rank, world_size)`` of the attached trainer, ``(0, 1)`` without one."""
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 0, 1
        return int(trainer.global_rank), int(trainer.world_size)

    def _counter(self, split: str) -> SkipCounter:
        if split not in self._counters:
            self._counters[split] = SkipCounter(self.max_errors, shared=self.num_workers > 0, name=split)
        return self._counters[split]

    @staticmethod
    def _resolve_shards(pattern: str | None, name: str) -> list[str]:
        if not pattern:
            raise ValueError(f"{name} is empty: give a shard pattern such as /data/x-{{000000..000009}}.tar")
        urls = expand_urls(pattern)
        check_local_shards(urls, pattern)
        check_shards_readable(urls, name)
        return urls

    def setup(self, stage: str | None = None) -> None:
        """Preflight: expand and check shard patterns, resolve sample counts, validate the config."""
        self._check_config()
        rank, world_size = self._distributed_info()
        if stage in (None, "fit"):
            self._train_urls = self._resolve_shards(self.train_shards, "train_shards")
            readers = world_size * max(self.num_workers, 1)
            if rank == 0 and len(self._train_urls) < readers:
                log.warning(
                    "%d training shards for %d readers (%d ranks x %d workers): training resamples shards, so this "
                    "works, but readers read the same shards; write at least %d shards for better mixing",
                    len(self._train_urls), readers, world_size, max(self.num_workers, 1), readers,
                )
            self._train_counts = lookup_shard_counts(self._train_urls)
            self._train_total = self.train_samples_per_epoch
            if self._train_total is None:
                counts = self._train_counts
                if counts is None:
                    raise ValueError(
                        "train_samples_per_epoch is required: no manifest.json next to "
                        f"{self.train_shards!r} lists its shards"
                    )
                self._train_total = sum(counts)
        if stage in ("validate", "test", "predict") and not self.val_shards:
            raise ValueError(f"stage {stage!r} needs val_shards, which is not set")
        if self.val_shards:
            self._val_urls = self._resolve_shards(self.val_shards, "val_shards")
            self._val_counts = lookup_shard_counts(self._val_urls)
            self._val_total = self.val_samples
            if self._val_total is None:
                if self._val_counts is None:
                    raise ValueError(
                        f"val_samples is required: no manifest.json next to {self.val_shards!r} lists its shards"
                    )
                self._val_total = sum(self._val_counts)
            eval_batch_plan(self._val_total, world_size, rank, self.val_batch_size or self.batch_size)
            readers = world_size * max(self.num_workers, 1)
            if rank == 0 and self._val_counts is None and readers > 1:
                log.warning(
                    "val shard sizes unknown (no manifest.json): each of the %d readers scans %s from the start",
                    readers, self.val_shards,
                )
            elif rank == 0 and len(self._val_urls) < readers:
                log.warning(
                    "%d val shards for %d readers (%d ranks x %d workers): readers share shards, each scanning a "
                    "shard from its start up to its own samples; write more shards for large validation sets",
                    len(self._val_urls), readers, world_size, max(self.num_workers, 1),
                )

    def train_steps(self) -> int:
        """Batches per rank and epoch: ``train_samples_per_epoch // (world_size * batch_size)``, at least 1."""
        if self._train_total is None:
            self.setup("fit")
        _, world_size = self._distributed_info()
        return max(1, self._train_total // (world_size * self.batch_size))

    def _next_train_epoch(self) -> int:
        self.epochs_seen += 1
        return self.epochs_seen

    def _resume_train_epoch(self, epoch: int) -> None:
        self.epochs_seen = epoch

    def _batches_trained_this_epoch(self) -> int | None:
        """Batches of the current epoch the training loop has run (``None`` without a trainer)."""
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return None
        return trainer.fit_loop.epoch_loop.batch_progress.current.processed

    def train_dataloader(self):
        """Endless resampled stream cut into epochs of :meth:`train_steps` batches."""
        if self._train_urls is None:
            self.setup("fit")
        rank, _ = self._distributed_info()
        steps = self.train_steps()
        what = f"train_shards {self.train_shards!r}"
        stream = ResampledTrainStream(
            self._train_urls,
            self.make_decoder(train=True),
            self._counter("train"),
            seed=self.seed,
            rank=rank,
            shuffle_buffer=self.shuffle_buffer,
            shard_counts=dict(zip(self._train_urls, self._train_counts)) if self._train_counts is not None else None,
            stall_timeout=self.stall_timeout,
            name=what,
        )
        decoder = stream.decoder
        pipeline = wds.DataPipeline(stream, wds.batched(self.batch_size, collation_fn=decoder.collate, partial=False))
        loader = EpochAwareLoader(
            pipeline,
            stream=stream,
            next_epoch=self._next_train_epoch,
            resume_epoch=self._resume_train_epoch,
            batches_done=self._batches_trained_this_epoch,
            steps=steps,
            what=what,
            stall_timeout=self.stall_timeout,
            batch_size=None,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=_pass_through,
            timeout=self._worker_timeout(self.num_workers),
        )
        return loader.with_epoch(steps).with_length(steps, silent=True)

    def val_dataloader(self):
        """This rank's share of ``val_shards``, each sample once; ``[]`` when ``val_shards`` is unset."""
        if not self.val_shards:
            return []
        if self._val_urls is None:
            self.setup("validate")
        rank, world_size = self._distributed_info()
        stream = EvalStream(
            self._val_urls,
            self._val_counts,
            self._val_total,
            rank=rank,
            world_size=world_size,
            batch_size=self.val_batch_size or self.batch_size,
            decoder=self.make_decoder(train=False),
            handler=self._counter("val"),
        )
        num_workers = min(self.num_workers, len(stream))
        loader = EvalLoader(
            stream,
            what=f"val_shards {self.val_shards!r}",
            finished=lambda samples: self._check_pass(samples, "val_shards", self.val_shards, self._val_urls, "val"),
            stall_timeout=self.stall_timeout,
            batch_size=None,
            num_workers=num_workers,
            persistent_workers=num_workers > 0,
            collate_fn=_pass_through,
            timeout=self._worker_timeout(num_workers),
        )
        return loader.with_length(len(stream), silent=True)

    def train_split_once(self):
        """The training shards read exactly once, without augmentation (for offline probes and statistics).

        Every sample once, in shard order (the first ``train_samples_per_epoch`` when no manifest lists
        the shards); batches as from :meth:`val_dataloader`, on one rank.
        """
        urls = self._resolve_shards(self.train_shards, "train_shards")
        counts = lookup_shard_counts(urls)
        total = sum(counts) if counts is not None else self.train_samples_per_epoch
        if total is None:
            raise ValueError(f"cannot tell how many samples {self.train_shards!r} holds: no manifest.json lists its "
                             "shards and train_samples_per_epoch is not set")
        stream = EvalStream(
            urls, counts, total, rank=0, world_size=1,
            batch_size=self.val_batch_size or self.batch_size,
            decoder=self.make_decoder(train=False),
            handler=self._counter("train-once"),
        )
        workers = min(self.num_workers, len(stream))
        return EvalLoader(
            stream,
            what=f"train_shards {self.train_shards!r}",
            finished=lambda samples: self._check_pass(samples, "train_shards", self.train_shards, urls, "train-once"),
            stall_timeout=self.stall_timeout,
            batch_size=None,
            num_workers=workers,
            collate_fn=_pass_through,
            timeout=self._worker_timeout(workers),
        )

    def _worker_timeout(self, num_workers: int) -> float:
        """The DataLoader's wait for a batch from its workers: ``stall_timeout`` with workers, else 0 (none)."""
        return float(self.stall_timeout or 0) if num_workers > 0 else 0.0

    def _check_pass(self, samples: int, name: str, pattern: str, urls: list[str], split: str) -> None:
        """Raise :class:`DataFault` when an evaluation pass yielded no sample on this rank or any other (a
        collective when distributed: every rank ends its pass, as every rank has the same number of batches)."""
        empty = torch.tensor([int(samples == 0)])
        trainer = self.trainer
        world_size = trainer.world_size if trainer is not None else 1
        if world_size > 1:
            empty = trainer.strategy.reduce(empty.to(trainer.strategy.root_device), reduce_op="sum")
        if not int(empty):
            return
        stage = trainer.state.stage.value if trainer is not None and trainer.state.stage is not None else None
        stage = PASS_NAMES.get(stage, "evaluation")
        ranks = f" on {int(empty)} of {world_size} ranks" if world_size > 1 else ""
        counter = self._counter(split)
        reasons = "; ".join(f"{reason} x{count}" for reason, count in counter.reasons.most_common(2))
        raise DataFault(
            f"the {stage} pass over {name} {pattern!r} read no sample{ranks} ({len(urls)} shards: "
            f"{listing([shard_name(url) for url in urls])}; {counter.skipped} skipped so far"
            + (f": {reasons})" if reasons else ")")
        )

    def test_dataloader(self):
        return self.val_dataloader()

    def predict_dataloader(self):
        return self.val_dataloader()

    def state_dict(self) -> dict:
        return {"seed": self.seed, "epochs_seen": self.epochs_seen}

    def load_state_dict(self, state_dict: dict) -> None:
        if state_dict.get("seed", self.seed) != self.seed:
            log.warning("restoring data seed %s from the checkpoint (configured: %s)", state_dict["seed"], self.seed)
        self.seed = int(state_dict.get("seed", self.seed))
        self.epochs_seen = int(state_dict.get("epochs_seen", 0))


