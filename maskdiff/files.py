"""Atomic writes: a file (or a directory) appears complete under its name, or the previous one stays.

Every write goes to a temporary name in the target's own directory, is flushed and fsynced, then renamed over the
target (``os.replace``: atomic within one filesystem), and the directory is fsynced so that the rename itself
survives a crash. On any error the temporary is removed and the previous target is untouched; an ``OSError`` (a full
disk, a quota, a read-only mount) is raised as a :class:`WriteError` naming the target and the free space of its
filesystem. A temporary left behind by a killed process is removed by the next write of the same target on the same
host. A directory replaces the previous one in two renames: the previous directory is renamed aside, the new one
into place, then the previous one is removed (should a crash fall between the renames, the next write of the target
puts the previous one back first).
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import secrets
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from PIL import Image

TEMPORARY = "tmp"
ASIDE = "old"


class WriteError(OSError):
    """``WriteError(errno, message)``: an ``OSError`` whose message is one line naming the path (``str()`` is the
    message alone)."""

    def __str__(self) -> str:
        return str(self.strerror)


def format_bytes(count: int) -> str:
    """``count`` bytes in binary units, e.g. ``12.3 MiB``."""
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    value, unit = float(count), 0
    while value >= 1024 and unit < len(units) - 1:
        value, unit = value / 1024, unit + 1
    return f"{count} B" if unit == 0 else f"{value:.1f} {units[unit]}"


def free_space(path: str | Path) -> str:
    """The free space of the filesystem holding ``path`` (or its nearest existing parent), e.g. ``1.5 GiB``."""
    existing = Path(path).expanduser().absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        return format_bytes(shutil.disk_usage(existing).free)
    except OSError:
        return "unknown"


def write_error(path: str | Path, error: OSError) -> WriteError:
    """``error`` as a :class:`WriteError` naming ``path`` and the free space of its filesystem."""
    if isinstance(error, WriteError):
        return error
    reason = error.strerror or str(error) or type(error).__name__
    return WriteError(error.errno, f"cannot write {path}: {reason} ({free_space(path)} free on its filesystem)")


# ---------------------------------------------------------------------------------------------- names
def _host() -> str:
    return socket.gethostname() or "host"


def _beside(target: Path, kind: str) -> Path:
    """A hidden name next to ``target`` that records this host and process, ending in ``.{kind}{suffix}`` (the
    target's suffix kept, for writers that choose their format by it)."""
    return target.with_name(f".{target.name}.{_host()}.{os.getpid()}.{secrets.token_hex(4)}.{kind}{target.suffix}")


def _owner(target: Path, leftover: Path, kind: str) -> tuple[str, int] | None:
    """``(host, pid)`` of the process that made ``leftover`` (a :func:`_beside` name of ``target``)."""
    head, tail = f".{target.name}.", f".{kind}{target.suffix}"
    if not (leftover.name.startswith(head) and leftover.name.endswith(tail)):
        return None
    middle = leftover.name[len(head) : len(leftover.name) - len(tail)]
    parts = middle.rsplit(".", 2)
    if len(parts) != 3 or not parts[1].isdigit():
        return None
    return parts[0], int(parts[1])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _leftovers(target: Path, kind: str) -> list[Path]:
    """The :func:`_beside` names of ``target`` left by dead processes of this host."""
    pattern = f".{glob.escape(target.name)}.*.{kind}{glob.escape(target.suffix)}"
    host = _host()
    found = []
    for leftover in target.parent.glob(pattern):
        owner = _owner(target, leftover, kind)
        if owner is not None and owner[0] == host and owner[1] != os.getpid() and not _alive(owner[1]):
            found.append(leftover)
    return found


def _os_error(error: BaseException) -> OSError | None:
    """The ``OSError`` behind ``error``: itself, or the one a ``RuntimeError`` was raised from or while handling
    (``torch.save`` reports a failed write so)."""
    if isinstance(error, OSError):
        return error
    behind = error.__cause__ or error.__context__
    return behind if isinstance(error, RuntimeError) and isinstance(behind, OSError) else None


def _remove(path: Path) -> None:
    """Remove a file, link or folder if possible (a cleanup: it never raises)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


def clean_leftovers(target: str | Path) -> None:
    """Remove what killed writers of ``target`` left next to it; a previous directory renamed aside by a writer
    killed before it put the new one in place is renamed back."""
    target = Path(target)
    for aside in _leftovers(target, ASIDE):
        if os.path.lexists(target):
            _remove(aside)
        else:
            os.rename(aside, target)
    for temporary in _leftovers(target, TEMPORARY):
        _remove(temporary)


# ---------------------------------------------------------------------------------------------- syncing
def _fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    except OSError as error:
        if error.errno not in (errno.EINVAL, errno.EBADF):  # a filesystem that cannot sync directories
            raise
    finally:
        os.close(descriptor)


def _fsync_tree(path: Path) -> None:
    for folder, _, names in os.walk(path):
        for name in names:
            _fsync(Path(folder) / name)
        _fsync(Path(folder))


def _replace(temporary: Path, target: Path) -> None:
    """Put ``temporary`` in place of ``target``: one ``os.replace`` for files, two renames when either is a
    directory (the previous one aside, the new one in place), then the previous one removed."""
    replacing_directory = target.is_dir() and not target.is_symlink()
    if os.path.lexists(target) and (replacing_directory or temporary.is_dir()):
        aside = _beside(target, ASIDE)
        os.rename(target, aside)
        os.rename(temporary, target)
        _fsync(target.parent)
        _remove(aside)
    else:
        os.replace(temporary, target)


# ---------------------------------------------------------------------------------------------- writers
@contextlib.contextmanager
def atomic_path(path: str | Path, directory: bool = False) -> Iterator[Path]:
    """A temporary path next to ``path`` (a new empty folder when ``directory``) for the block to write; it
    replaces ``path`` when the block ends without error and is removed otherwise."""
    target = Path(path).expanduser()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        clean_leftovers(target)
        temporary = _beside(target, TEMPORARY)
        if directory:
            temporary.mkdir()
    except OSError as error:
        raise write_error(target, error) from error
    try:
        yield temporary
        if directory:
            _fsync_tree(temporary)
        else:
            _fsync(temporary)
        _replace(temporary, target)
        _fsync(target.parent)
    except BaseException as error:
        _remove(temporary)
        cause = _os_error(error)
        if cause is not None:
            raise write_error(target, cause) from error
        raise


def atomic_directory(path: str | Path) -> contextlib.AbstractContextManager[Path]:
    """A temporary folder next to ``path`` to fill; it replaces ``path`` (file or folder) when the block ends
    without error."""
    return atomic_path(path, directory=True)


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "wb", **kwargs: Any) -> Iterator[IO]:
    """``open(path, mode)`` for writing, atomically: the file appears complete when the block ends without error."""
    if not mode.startswith("w"):
        raise ValueError(f"atomic_open writes a whole file: mode must start with 'w', got {mode!r}")
    with atomic_path(path) as temporary, open(temporary, mode, **kwargs) as handle:
        yield handle
        handle.flush()


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    with atomic_open(path, "wb") as handle:
        handle.write(data)
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_open(path, "w", encoding="utf-8") as handle:
        handle.write(text)
    return Path(path)


def write_json(path: str | Path, value: Any, indent: int | None = 2, sort_keys: bool = False) -> Path:
    """Write ``value`` as JSON (one trailing newline) to ``path`` atomically."""
    return write_text(path, json.dumps(value, indent=indent, sort_keys=sort_keys) + "\n")


def save_torch(value: Any, path: str | Path) -> Path:
    """``torch.save(value, path)``, atomically (through a Python file, so that a failed write keeps its ``errno``)."""
    with atomic_open(path) as handle:
        torch.save(value, handle)
    return Path(path)


def save_npz(path: str | Path, *arrays: np.ndarray, **named: np.ndarray) -> Path:
    """``np.savez(path, *arrays, **named)`` (uncompressed; the name is kept as given), atomically."""
    with atomic_open(path) as handle:
        np.savez(handle, *arrays, **named)
    return Path(path)


def link_or_copy(source: str | Path, link: str | Path) -> Path:
    """Make ``link`` a relative symbolic link to ``source``, or a copy of it where links are not supported, replacing
    what ``link`` was in one rename."""
    source, link = Path(source), Path(link)
    with atomic_path(link) as temporary:
        try:
            os.symlink(os.path.relpath(source, link.parent), temporary)
        except OSError:
            if source.is_dir():
                shutil.copytree(source, temporary)
            else:
                with open(source, "rb") as original, open(temporary, "wb") as copy:
                    shutil.copyfileobj(original, copy)
    return link


def image_format(path: str | Path) -> str:
    """The Pillow format that ``path``'s suffix names (``.png`` -> ``PNG``); ``ValueError`` for an unknown one."""
    suffix = Path(path).suffix.lower()
    known = Image.registered_extensions()
    if suffix not in known:
        raise ValueError(f"cannot tell the image format of {path} from its suffix (e.g. .png, .jpg, .gif)")
    return known[suffix]


def save_image(image: Image.Image, path: str | Path, **params: Any) -> Path:
    """``image.save(path, **params)`` in the format of ``path``'s suffix, atomically."""
    kind = image_format(path)
    with atomic_open(path) as handle:
        image.save(handle, format=kind, **params)
    return Path(path)


# ---------------------------------------------------------------------------------------------- checks
def _write_check(folder: Path, create: bool) -> OSError | None:
    """The error met creating (when ``create``) and writing a file in ``folder`` (``None``: none)."""
    try:
        if os.path.lexists(folder) and not folder.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "it exists and is not a directory")
        if create:
            folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".maskdiff-write-check-"):
            pass
    except OSError as error:
        return error
    return None


def ensure_writable_directory(path: str | Path, what: str = "directory") -> Path:
    """Create ``path`` if missing and prove it writable by creating and removing a file in it; an ``OSError``
    naming ``what`` and the path otherwise."""
    folder = Path(path).expanduser()
    error = _write_check(folder, create=True)
    if error is not None:
        raise WriteError(error.errno, f"{what} {folder} is not writable: {error.strerror or error}") from error
    return folder


def writable_directory_problem(path: str | Path, what: str = "directory") -> str | None:
    """Why ``path`` cannot serve as a writable directory, found without creating anything (``None``: it can): it,
    or its nearest existing parent when it is missing, must be a directory that takes a new file."""
    folder = Path(path).expanduser().absolute()
    existing = folder
    while not os.path.lexists(existing) and existing != existing.parent:
        existing = existing.parent
    error = _write_check(existing, create=False)
    if error is None:
        return None
    where = "" if existing == folder else f" (at {existing})"
    return f"{what} {folder} is not writable: {error.strerror or error}{where}"
