"""Reading shards: a check that each local shard can be read before a run starts, and one pass over one shard that
says why it ended early (a tar error, a cut without the end-of-archive marker), through webdataset's tar stages."""

from __future__ import annotations

import contextlib
import glob
import os
import signal
import tarfile
import time
import weakref
import zlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from webdataset.gopen import Pipe, gopen
from webdataset.tariterators import group_by_keys, tar_file_expander

from .faults import DataFault, skip_reason
from .shards import is_remote, local_path

SHARD_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error)
COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ", b"\x28\xb5\x2f\xfd")
END_OF_ARCHIVE = 2 * tarfile.BLOCKSIZE
LISTED = 5

_open_pipes: weakref.WeakSet[Pipe] = weakref.WeakSet()


def shard_name(url: str) -> str:
    """The file name of a shard URL, for messages and example keys."""
    return os.path.basename(local_path(url).rstrip("/")) or url


def shard_problem(url: str) -> str | None:
    """Why the local shard ``url`` cannot give a sample (it cannot be opened, is empty, is not a tar or holds no
    member), or ``None``. Reads its first header only; remote URLs are not checked (``None``)."""
    if is_remote(url):
        return None
    path = local_path(url)
    try:
        with open(path, "rb") as handle:
            if os.fstat(handle.fileno()).st_size == 0:
                return "is an empty file (0 bytes)"
            with tarfile.open(fileobj=handle, mode="r|*") as tar:
                if tar.next() is None:
                    return "is a tar file with no members"
    except OSError as exn:
        return f"cannot be opened ({type(exn).__name__}: {exn.strerror or exn})"
    except (tarfile.TarError, EOFError, zlib.error) as exn:
        return f"is not a tar file ({skip_reason(exn)})"
    return None


def listing(items: Sequence[str], limit: int = LISTED) -> str:
    """``"a, b, c and 4 more"``."""
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def check_shards_readable(urls: Sequence[str], name: str) -> None:
    """Raise ``ValueError`` when local shards of ``urls`` cannot give a sample (:func:`shard_problem`), naming how many
    and the first :data:`LISTED` with their problem; ``name`` is the option the shards came from."""
    problems = [(url, problem) for url in urls if (problem := shard_problem(url)) is not None]
    if problems:
        raise ValueError(
            f"{name}: {len(problems)} of {len(urls)} shards cannot be read: "
            + listing([f"{local_path(url)} {problem}" for url, problem in problems])
        )


def tail_is_complete(url: str) -> bool | None:
    """Whether the local uncompressed tar ``url`` ends with the end-of-archive marker (two zero blocks), which a
    shard cut short lacks; ``None`` when that cannot be told (remote, compressed, unreadable)."""
    if is_remote(url):
        return None
    try:
        with open(local_path(url), "rb") as handle:
            if handle.read(4).startswith(COMPRESSED_MAGIC):
                return None
            size = os.fstat(handle.fileno()).st_size
            if size % tarfile.BLOCKSIZE or size < END_OF_ARCHIVE:
                return False
            handle.seek(size - END_OF_ARCHIVE)
            return not handle.read(END_OF_ARCHIVE).strip(b"\0")
    except OSError:
        return None


def _descendants(pid: int) -> list[int]:
    """Process ids below ``pid`` (Linux ``/proc``; empty elsewhere)."""
    found = []
    for listing_file in glob.glob(f"/proc/{pid}/task/*/children"):
        with contextlib.suppress(OSError, ValueError):
            for child in map(int, Path(listing_file).read_text().split()):
                found += [child, *_descendants(child)]
    return found


def kill_open_pipes() -> None:
    """Kill the commands of the ``pipe:`` shards this process is reading, with their own children (a stalled one
    would otherwise keep the process from exiting: closing a pipe waits for its command). The commands of DataLoader
    worker processes, which the DataLoader ends, are not reached: a stalled one outlives its worker until it writes
    (and gets SIGPIPE) or ends."""
    for pipe in list(_open_pipes):
        if pipe.proc.poll() is not None:
            continue
        for pid in [*_descendants(pipe.proc.pid), pipe.proc.pid]:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


class ShardRead:
    """One pass over one shard: iterating yields its samples (webdataset dicts), in tar order.

    ``on_sample_error(exn, key)`` is called for a sample webdataset cannot assemble (a duplicate member name) and
    must return ``True`` to go on. A tar error (the shard cannot be opened, a header or a member is cut or corrupt)
    ends the pass; so does the end of the file. When the pass ended on an error, or the local file lacks the
    end-of-archive marker, the last sample read is dropped too (its members may be incomplete), and ``fault`` says
    why; ``kept`` counts the samples yielded.
    """

    def __init__(self, url: str, on_sample_error: Callable[[BaseException, str | None], bool]):
        self.url = url
        self.on_sample_error = on_sample_error
        self.kept = 0
        self.fault: str | None = None
        self._errors: list[BaseException] = []
        self._opened = False

    def _handle(self, exn: BaseException) -> bool:
        if isinstance(exn, SHARD_ERRORS):
            self._errors.append(exn)
            return True
        return self.on_sample_error(exn, shard_name(self.url))

    def _sources(self) -> Iterator[dict]:
        try:
            stream = gopen(self.url)
        except Exception as exn:
            self._handle(exn)
            return
        if isinstance(stream, Pipe):
            _open_pipes.add(stream)
        self._opened = True
        try:
            yield dict(url=self.url, stream=stream)
        finally:
            with contextlib.suppress(Exception):
                stream.close()

    def __iter__(self) -> Iterator[dict]:
        files = tar_file_expander(self._sources(), handler=self._handle)
        pending = None
        for sample in group_by_keys(files, handler=self._handle):
            if pending is not None:
                self.kept += 1
                yield pending
            pending = sample
        if self._errors:
            state = "unreadable or cut short" if self._opened else "cannot be opened"
            self.fault = f"shard {state} ({skip_reason(self._errors[0])})"
        elif pending is not None and tail_is_complete(self.url) is False:
            self.fault = "shard cut short (no tar end-of-archive marker)"
        if pending is not None and self.fault is None:
            self.kept += 1
            yield pending

    def losses(self, expected: int | None) -> tuple[int, str] | None:
        """``(samples lost, reason)`` of this finished pass, or ``None``: with ``expected`` (the manifest's count)
        the samples missing from it; without, one for a pass that ended on a fault (the samples after the cut
        cannot be counted)."""
        if expected is not None and self.kept < expected:
            return expected - self.kept, self.fault or "shard holds fewer samples than its manifest lists"
        if expected is None and self.fault is not None:
            return 1, f"{self.fault}; the samples after the cut are uncounted (no manifest.json count)"
        return None


class NoSampleBound:
    """Stops a resampled stream over ``urls`` that yields nothing: :meth:`passed` (after each shard read) raises a
    :class:`DataFault` naming the shards once every shard was read without a sample since the last sample, or
    ``timeout`` seconds (``None``: no limit) passed without one. ``name`` says what the shards are."""

    def __init__(self, urls: Sequence[str], name: str, timeout: float | None):
        self.urls = set(urls)
        self.name = name
        self.timeout = timeout
        self.empty: dict[str, str] = {}
        self.reads = 0
        self.since = time.monotonic()

    def passed(self, shard: ShardRead) -> None:
        if shard.kept:
            self.empty.clear()
            self.reads = 0
            self.since = time.monotonic()
            return
        self.reads += 1
        self.empty[shard.url] = shard.fault or "no samples"
        waited = time.monotonic() - self.since
        timed_out = self.timeout is not None and self.timeout > 0 and waited > self.timeout
        if len(self.empty) == len(self.urls) or timed_out:
            which = (f"none of its {len(self.urls)} shards gives one" if len(self.empty) == len(self.urls)
                     else f"stall_timeout={self.timeout:g} s passed; {len(self.empty)} of {len(self.urls)} shards read")
            raise DataFault(
                f"no sample from {self.name} in {self.reads} shard reads over {waited:.1f} s, {which}: "
                + listing([f"{shard_name(url)} ({why})" for url, why in self.empty.items()])
            )
