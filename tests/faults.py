"""Real faults for tests of what survives them: a disk that fills after N bytes, a small tmpfs, a killed writer."""

from __future__ import annotations

import builtins
import contextlib
import errno
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from maskdiff import files


class FullDisk:
    """A file opened for writing whose writes fail with ``ENOSPC`` once ``limit`` bytes are written (the bytes
    before the limit really reach the file, as on a disk that fills up)."""

    def __init__(self, handle, limit: int) -> None:
        self.handle = handle
        self.left = limit

    def write(self, data) -> int:
        data = bytes(data) if not isinstance(data, str) else data
        if len(data) > self.left:
            self.handle.write(data[: self.left])
            self.left = 0
            raise OSError(errno.ENOSPC, "No space left on device")
        self.left -= len(data)
        return self.handle.write(data)

    def __getattr__(self, name):
        return getattr(self.handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.handle.close()


def fill_disk_after(monkeypatch: pytest.MonkeyPatch, limit: int, target: str | None = None) -> list[Path]:
    """Make every atomic write of :mod:`maskdiff.files` (of a file named ``target`` only, when given) hit
    ``ENOSPC`` after ``limit`` bytes; returns the temporary files it failed (to check they are gone)."""
    opened: list[Path] = []

    def full_open(path, mode="r", *args, **kwargs):
        handle = builtins.open(path, mode, *args, **kwargs)
        if target is not None and not Path(path).name.startswith(f".{target}."):
            return handle
        opened.append(Path(path))
        return FullDisk(handle, limit)

    monkeypatch.setattr(files, "open", full_open, raising=False)
    return opened


@contextlib.contextmanager
def small_tmpfs(folder: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``folder`` (skips the test where mounting is not allowed)."""
    folder.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def leftovers(folder: Path) -> list[str]:
    """Hidden temporary or set-aside names of :mod:`maskdiff.files` in ``folder``."""
    return sorted(path.name for path in folder.iterdir() if path.name.startswith(".") and
                  (".tmp" in path.name or ".old" in path.name))
