"""The data modules' loaders: a training loader that knows its epoch and resumes one exactly, an evaluation loader
that stops a pass over no sample, and waits for batches that SIGTERM and SIGINT end at once."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Callable, Iterator

import webdataset as wds

from .faults import DataFault
from .reading import kill_open_pipes
from .streams import ResampledTrainStream

log = logging.getLogger("maskdiff.data")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGINT arrived while the run waited for data (a ``KeyboardInterrupt``: Lightning shuts down as
    after Ctrl-C, ending the processes it launched, and exits with status 1)."""


def _stop(what: str) -> Callable:
    """The signal handler of :func:`stop_on_signal`."""

    def handler(signum: int, frame) -> None:
        kill_open_pipes()
        os.write(2, f"maskdiff: {signal.Signals(signum).name} while waiting for {what}: stopping\n".encode())
        raise Interrupted(f"{signal.Signals(signum).name} while waiting for {what}")

    return handler


@contextlib.contextmanager
def stop_on_signal(what: str) -> Iterator[None]:
    """While inside, SIGTERM and SIGINT stop the run at once: the ``pipe:`` commands this process reads are
    killed, one line naming the signal and ``what`` was awaited goes to stderr, and :class:`Interrupted` is
    raised. A loader stalled in a read (a hung ``pipe:`` or network filesystem) never reaches the end of a
    batch, where Lightning looks at the SIGTERM it received. Outside the main thread, and for a signal whose handler
    was not set from Python, nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    previous = {signum: earlier for signum, earlier in previous.items() if earlier is not None}
    handler = _stop(what)
    for signum in previous:
        signal.signal(signum, handler)
    try:
        yield
    finally:
        for signum, earlier in previous.items():
            signal.signal(signum, earlier)


def waited_batches(batches: Iterator, what: str, stall_timeout: float | None) -> Iterator:
    """``batches``, each waited for under :func:`stop_on_signal`; the DataLoader's timeout (``stall_timeout``,
    with worker processes) becomes a :class:`DataFault` naming ``what``."""
    while True:
        with stop_on_signal(what):
            try:
                batch = next(batches)
            except StopIteration:
                return
            except RuntimeError as exn:
                if not str(exn).startswith("DataLoader timed out"):
                    raise
                raise DataFault(f"no batch of {what} within stall_timeout={stall_timeout:g} s: "
                                "a DataLoader worker is stalled reading its shards") from exn
        yield batch


class EvalLoader(wds.WebLoader):
    """A WebLoader over an :class:`~maskdiff.data.streams.EvalStream` of ``len(dataset)`` batches that waits for
    them with :func:`waited_batches` and, on the last one and before handing it on (a loop that knows the length
    asks for no more), calls ``finished(samples)`` with the number of samples the pass held (labels last in each
    batch)."""

    def __init__(self, dataset, what: str, finished: Callable[[int], None], stall_timeout: float | None, **kwargs):
        super().__init__(dataset, **kwargs)
        self.what = what
        self.finished = finished
        self.stall_timeout = stall_timeout
        self.batches = len(dataset)

    def iterator1(self):
        samples = 0
        for count, batch in enumerate(waited_batches(super().iterator1(), self.what, self.stall_timeout), start=1):
            samples += len(batch[-1])
            if count == self.batches:
                self.finished(samples)
            yield batch


class EpochAwareLoader(wds.WebLoader):
    """A WebLoader that tells its training stream the new epoch number when an epoch's first batch is asked for,
    and that resumes an interrupted epoch exactly.

    Counting happens lazily (not in ``__iter__``) because Lightning probes non-DataLoader loaders
    with a bare ``iter()`` before fitting.

    Lightning saves :meth:`state_dict` in every checkpoint: the epoch being read and how many of its batches
    were trained on (``batches_done()``, the training loop's count, since the loop prefetches one batch ahead).
    :meth:`load_state_dict` makes the next epoch the interrupted one again and fast-forwards past the batches
    already trained on: they are read and decoded again (the stream is only reproducible by replaying it), not
    trained on. Each epoch's stream is a function of the epoch number alone, so the replay is exact.

    Batches are waited for with :func:`waited_batches` (``what``: the shards, for messages).
    """

    def __init__(
        self,
        dataset,
        stream: ResampledTrainStream,
        next_epoch: Callable[[], int],
        resume_epoch: Callable[[int], None],
        batches_done: Callable[[], int | None],
        steps: int,
        what: str = "training data",
        stall_timeout: float | None = None,
        **kwargs,
    ):
        super().__init__(dataset, **kwargs)
        self._what = what
        self._stall_timeout = stall_timeout
        self._stream = stream
        self._next_epoch = next_epoch
        self._resume_epoch = resume_epoch
        self._batches_done = batches_done
        self._steps = steps
        self._epoch: int | None = None
        self._yielded = 0
        self._pending: tuple[int, int] | None = None

    def iterator1(self):
        if self._pending is not None:
            epoch, skip = self._pending
            self._pending = None
            self._resume_epoch(epoch)
        else:
            epoch, skip = self._next_epoch(), 0
        self._stream.epoch, self._epoch, self._yielded = epoch, epoch, 0
        batches = waited_batches(super().iterator1(), self._what, self._stall_timeout)
        for _ in range(skip):
            next(batches)
        for batch in batches:
            self._yielded += 1
            yield batch

    def state_dict(self) -> dict:
        done = self._batches_done()
        return {"epoch": self._epoch, "batches_done": self._yielded if done is None else done, "steps": self._steps}

    def load_state_dict(self, state: dict) -> None:
        epoch, done, steps = state.get("epoch"), int(state.get("batches_done", 0)), int(state.get("steps", self._steps))
        if epoch is None or done <= 0 or done >= steps:
            return
        if steps != self._steps:
            log.warning(
                "the checkpoint was taken %d/%d batches into epoch %d with another epoch length (now %d batches): "
                "starting a fresh epoch instead of replaying the interrupted one", done, steps, epoch, self._steps,
            )
            return
        self._pending = (int(epoch), done)
