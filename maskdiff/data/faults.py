"""Data faults: the one-line error that stops a run, and the counter of skipped samples with their reasons."""

from __future__ import annotations

import collections
import ctypes
import logging
import multiprocessing
import os
import re

log = logging.getLogger("maskdiff.data")

_OBJECT_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
_TAR_POSITION = re.compile(r" @ <[^>]*>")
_QUALIFIED_NAME = re.compile(r"^[A-Za-z_][\w.]*: ")


def _worker_message(message: str) -> str:
    """The exception line of a DataLoader worker's report (``"Caught X in DataLoader worker process 0.\\nOriginal
    Traceback ...\\npackage.X: line"``), or ``message`` itself when it is not one."""
    if not message.startswith("Caught ") or "Original Traceback" not in message:
        return message
    last = message.rstrip().splitlines()[-1]
    return _QUALIFIED_NAME.sub("", last, count=1)


class DataFault(ValueError):
    """A fault of the data that stops the run, said in one line naming the shards (a ``ValueError``: the
    ``maskdiff`` command prints it as a user's error, ``maskdiff: error: <message>``).

    PyTorch re-raises an exception of a DataLoader worker in the main process as ``type(report)``, where the report
    holds the worker's traceback; this class keeps the one line of the original message.
    """

    def __init__(self, message: str):
        super().__init__(_worker_message(message))


def skip_reason(exn: BaseException, key: str | None = None) -> str:
    """``"ExceptionType: message"`` without what differs between equal faults: object addresses, the tar
    position webdataset appends and the sample's ``key`` (the decoders' ``sample 'key'``), so that equal faults
    count together."""
    message = exn.args[0] if exn.args and isinstance(exn.args[0], str) else str(exn)
    message = _OBJECT_ADDRESS.sub("", _TAR_POSITION.sub("", message))
    if key:
        message = message.replace(f"sample {key!r}", "sample")
    return f"{type(exn).__name__}: {message}"[:300]


def _is_power_of_ten(n: int) -> bool:
    while n >= 10 and n % 10 == 0:
        n //= 10
    return n == 1


class _SharedTally:
    """Read and skip totals and a bounded table of skip reasons with example keys, in shared memory, for DataLoader
    worker processes.

    ``max_reasons`` reason slots of ``reason_bytes`` UTF-8 bytes, each with a count and ``max_examples`` example
    keys of ``example_bytes``, plus one ``"<other>"`` count; the lock of ``skipped`` guards the table.
    """

    def __init__(self, max_reasons: int, max_examples: int, reason_bytes: int = 320, example_bytes: int = 120):
        self.reason_bytes = reason_bytes
        self.example_bytes = example_bytes
        self.max_examples = max_examples
        self.read = multiprocessing.Value("q", 0)
        self.skipped = multiprocessing.Value("q", 0)
        self.texts = multiprocessing.Array(ctypes.c_char, max_reasons * reason_bytes, lock=False)
        self.counts = multiprocessing.Array(ctypes.c_int64, max_reasons + 1, lock=False)
        self.example_texts = multiprocessing.Array(ctypes.c_char, max_reasons * max_examples * example_bytes, lock=False)

    @staticmethod
    def _get(array, index: int, width: int) -> bytes:
        return array[index * width : (index + 1) * width].rstrip(b"\0")

    @staticmethod
    def _put(array, index: int, width: int, text: str) -> None:
        data = text.encode("utf-8", "replace")[:width].rstrip(b"\0")
        array[index * width : (index + 1) * width] = data.ljust(width, b"\0")

    def add_skip(self, reason: str, example: str | None, count: int) -> int:
        """Count ``count`` skips for ``reason``; returns the new skip total."""
        text = reason.encode("utf-8", "replace")[: self.reason_bytes].rstrip(b"\0")
        slots = len(self.counts) - 1
        with self.skipped.get_lock():
            self.skipped.value += count
            slot = next((i for i in range(slots) if self.counts[i] and self._get(self.texts, i, self.reason_bytes) == text), None)
            if slot is None:
                slot = next((i for i in range(slots) if not self.counts[i]), slots)
                if slot < slots:
                    self._put(self.texts, slot, self.reason_bytes, reason)
                    for k in range(self.max_examples):
                        self._put(self.example_texts, slot * self.max_examples + k, self.example_bytes, "")
            self.counts[slot] += count
            if example and slot < slots:
                known = self._examples(slot)
                if example not in known and len(known) < self.max_examples:
                    self._put(self.example_texts, slot * self.max_examples + len(known), self.example_bytes, example)
            return int(self.skipped.value)

    def _examples(self, slot: int) -> list[str]:
        found = (self._get(self.example_texts, slot * self.max_examples + k, self.example_bytes)
                 for k in range(self.max_examples))
        return [text.decode("utf-8", "ignore") for text in found if text]

    def table(self) -> tuple[collections.Counter, dict[str, list[str]]]:
        slots = len(self.counts) - 1
        with self.skipped.get_lock():
            names = {i: self._get(self.texts, i, self.reason_bytes).decode("utf-8", "ignore")
                     for i in range(slots) if self.counts[i]}
            reasons = collections.Counter({name: int(self.counts[i]) for i, name in names.items()})
            examples = {name: self._examples(i) for i, name in names.items()}
            if self.counts[slots]:
                reasons["<other>"] = int(self.counts[slots])
        return reasons, examples

    def reset(self) -> None:
        with self.read.get_lock():
            self.read.value = 0
        with self.skipped.get_lock():
            self.skipped.value = 0
            self.counts[:] = [0] * len(self.counts)


class SkipCounter:
    """Counts samples read and skipped, with the reasons of the skips and a few example keys of each; as a
    webdataset error handler (``handler(exn) -> True``: skip and continue) it never sleeps (webdataset's
    ``warn_and_continue`` sleeps 0.5 s per error).

    A stream calls :meth:`count_read` for each sample it decoded, the handler (``counter(exn, key)``) for each
    sample that failed to decode, and :meth:`skip` for samples lost without an exception of their own (the rest
    of a shard cut short). Once more than ``max_errors`` samples were skipped, a :class:`DataFault` naming the
    split stops the run. The first ``log_first`` skips of each process, and then the 10th, 100th, 1000th, ...,
    are logged as warnings on the ``maskdiff.data`` logger.

    DataLoader workers are separate processes holding their own copy: with ``shared=True`` the totals (and so the
    ``max_errors`` budget), the reasons and their examples live in shared memory of the default start method's
    context, shared by all workers started after construction (the DataLoader must use that default context).

    Attributes:
        read: samples decoded successfully (all workers when ``shared``).
        skipped: number of skipped samples (all workers when ``shared``).
        reasons: ``Counter`` of reasons (:func:`skip_reason` of the exception, or the reason given to
            :meth:`skip`); at most ``max_reasons`` distinct reasons are kept, the rest count under ``"<other>"``.
        examples: ``reason -> [key, ...]``, the first ``max_examples`` distinct keys (or shard names) skipped
            for each kept reason.
    """

    def __init__(
        self,
        max_errors: int | None = None,
        log_first: int = 5,
        max_reasons: int = 10,
        shared: bool = False,
        name: str = "data",
        max_examples: int = 3,
    ):
        self.max_errors = max_errors
        self.log_first = log_first
        self.max_reasons = max_reasons
        self.max_examples = max_examples
        self.name = name
        self._local_reasons: collections.Counter[str] = collections.Counter()
        self._local_examples: dict[str, list[str]] = {}
        self._local_skipped = 0
        self._local_events = 0
        self._local_read = 0
        self._shared = _SharedTally(max_reasons, max_examples) if shared else None

    @property
    def skipped(self) -> int:
        if self._shared is not None:
            return int(self._shared.skipped.value)
        return self._local_skipped

    @property
    def read(self) -> int:
        if self._shared is not None:
            return int(self._shared.read.value)
        return self._local_read

    @property
    def reasons(self) -> collections.Counter:
        if self._shared is not None:
            return self._shared.table()[0]
        return collections.Counter(self._local_reasons)

    @property
    def examples(self) -> dict[str, list[str]]:
        if self._shared is not None:
            return self._shared.table()[1]
        return {reason: list(keys) for reason, keys in self._local_examples.items()}

    def count_read(self, samples: int = 1) -> None:
        """Count ``samples`` successfully decoded samples."""
        if self._shared is not None:
            with self._shared.read.get_lock():
                self._shared.read.value += samples
        else:
            self._local_read += samples

    def reset(self) -> None:
        self._local_reasons.clear()
        self._local_examples.clear()
        self._local_skipped = 0
        self._local_events = 0
        self._local_read = 0
        if self._shared is not None:
            self._shared.reset()

    def skip(self, reason: str, example: str | None = None, count: int = 1, cause: BaseException | None = None) -> None:
        """Count ``count`` samples skipped for ``reason`` (``example``: the key or shard they came from); raises
        :class:`DataFault` once more than ``max_errors`` were skipped."""
        self._local_skipped += count
        self._local_events += 1
        if self._shared is not None:
            total = self._shared.add_skip(reason, example, count)
        else:
            total = self._local_skipped
            kept = reason in self._local_reasons or len(self._local_reasons) < self.max_reasons
            self._local_reasons[reason if kept else "<other>"] += count
            examples = self._local_examples.setdefault(reason, []) if kept else []
            if kept and example and example not in examples and len(examples) < self.max_examples:
                examples.append(example)
        if self._local_events <= self.log_first or _is_power_of_ten(self._local_events):
            what = (f"{count} samples" if count != 1 else "a sample") + (f" ({example})" if example else "")
            log.warning("%s: skipped %s (%d skipped in total, pid %d): %s", self.name, what, total, os.getpid(), reason)
        if self.max_errors is not None and total > self.max_errors:
            raise DataFault(f"{self.name}: more than max_errors={self.max_errors} samples failed to read or decode "
                            f"({total} skipped); the last: {reason} ({example or '?'})") from cause

    def __call__(self, exn: BaseException, example: str | None = None) -> bool:
        self.skip(skip_reason(exn, example), example, cause=exn)
        return True

    def __repr__(self) -> str:
        return f"SkipCounter(name={self.name!r}, read={self.read}, skipped={self.skipped}, max_errors={self.max_errors})"
