"""Checkpoints on disk: Lightning's ``CheckpointIO`` writing through :mod:`maskdiff.files`, loading only data.

:class:`AtomicCheckpointIO` is what every ``fit``/``validate``/``test`` run of the ``maskdiff`` command saves and
resumes with (single device and DDP; :class:`maskdiff.scale.BackboneFSDPStrategy` uses it for its full and sharded
saves): a checkpoint, ``last.ckpt`` included, is written to a temporary file next to it and renamed over it, so a
full disk, a crash or a SIGKILL leaves the previous one intact. Loading passes ``weights_only=True`` (no pickled
code runs). :func:`checkpoint_problem` tells cheaply whether a checkpoint file or sharded directory would load.
``ModelCheckpoint(save_last="link")`` links ``last.ckpt`` in one rename too (:func:`use_atomic_checkpoints`).
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from maskdiff.files import atomic_path, link_or_copy, save_torch

SHARDED_METADATA = ".metadata"
SHARDED_EXTRA = "meta.pt"
_DCP_METADATA_CLASSES = {
    ("torch.distributed.checkpoint.metadata", name)
    for name in ("Metadata", "TensorStorageMetadata", "TensorProperties", "ChunkStorageMetadata",
                 "BytesStorageMetadata", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PurePosixPath"),
    ("collections", "OrderedDict"),
}
_TORCH_DTYPES = {name for name, value in vars(torch).items() if isinstance(value, torch.dtype)}


class AtomicCheckpointIO(TorchCheckpointIO):
    """:class:`~lightning.pytorch.plugins.io.TorchCheckpointIO` whose local saves are atomic
    (:func:`maskdiff.files.save_torch`: a failed save names the file and the free space, and leaves the previous
    checkpoint as it was) and whose loads always pass ``weights_only=True``."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local_file_protocol(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        save_torch(checkpoint, local_path(path))

    def load_checkpoint(
        self, path: str | Path, map_location: Callable | None = lambda storage, loc: storage,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        if weights_only is False:
            raise ValueError(f"maskdiff loads checkpoints with weights_only=True only (no pickled code runs): {path}")
        try:
            return super().load_checkpoint(path, map_location=map_location, weights_only=True)
        except FileNotFoundError:
            raise
        except Exception as error:  # noqa: BLE001 -- torch raises many kinds for a file that is not a checkpoint
            raise ValueError(f"{path} does not load as a checkpoint: {_reason(error)}") from error


def local_path(path: str | Path) -> Path:
    """``path`` without a ``file://`` scheme."""
    text = str(path)
    return Path(text[len("file://"):] if text.startswith("file://") else text)


def save_sharded(path: str | Path, write: Callable[[Path], None], finish: Callable[[Path], None] | None = None,
                 barrier: Callable[[], None] = lambda: None, broadcast: Callable[[Any], Any] = lambda value: value,
                 is_writer: bool = True) -> None:
    """Write a sharded checkpoint directory atomically: every rank calls this; ``write(folder)`` writes each rank's
    shards into one temporary folder next to ``path`` (its name chosen by the writer rank and broadcast), then the
    writer rank runs ``finish(folder)`` (e.g. the metadata file) and puts the folder in place of ``path``, the
    previous checkpoint being renamed aside first and removed after. When the writer rank's part fails, the folder
    is removed and the previous checkpoint stays."""
    target = local_path(path)
    if is_writer:
        with atomic_path(target, directory=True) as folder:
            folder = Path(broadcast(str(folder)))
            write(folder)
            barrier()
            if finish is not None:
                finish(folder)
    else:
        folder = Path(broadcast(None))
        write(folder)
        barrier()


def weights_only_refusal(error: BaseException) -> str | None:
    """The weights-only unpickler's own reason for refusing a file, in one line (not torch's advice to load the file
    unsafely), or ``None`` when ``error`` is not such a refusal."""
    text = str(error)
    if "WeightsUnpickler error:" not in text:
        return None
    return " ".join(text.split("WeightsUnpickler error:", 1)[1].split()).split(". ")[0]


def _reason(error: BaseException) -> str:
    """``error`` of a load in one line: the weights-only refusal, else the first line of the message."""
    refusal = weights_only_refusal(error)
    if refusal is not None:
        return f"UnpicklingError: it pickles more than tensors and plain data ({refusal})"
    text = str(error)
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0] if lines else 'no message'}"


class _MetadataUnpickler(pickle.Unpickler):
    """The unpickler of a ``torch.distributed.checkpoint`` ``.metadata`` file that admits only its own classes."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _DCP_METADATA_CLASSES or (module == "torch" and name in _TORCH_DTYPES):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused global {module}.{name} (not a sharded-checkpoint metadata class)")


def check_sharded_metadata(folder: str | Path) -> None:
    """Read ``folder/.metadata`` (which ``torch.distributed.checkpoint`` reads with plain ``pickle``) with an
    unpickler that admits only checkpoint-metadata classes; ``ValueError`` naming the file otherwise."""
    path = Path(folder) / SHARDED_METADATA
    try:
        with path.open("rb") as handle:
            _MetadataUnpickler(handle).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, ValueError, TypeError) as error:
        raise ValueError(f"{path} is not a readable sharded-checkpoint metadata file ({_reason(error)})") from error


def is_sharded_checkpoint(path: str | Path) -> bool:
    """True for a directory written by a sharded FSDP save (it holds ``meta.pt``)."""
    path = Path(path)
    return path.is_dir() and (path / SHARDED_EXTRA).is_file()


def checkpoint_problem(path: str | Path) -> str | None:
    """Why the checkpoint at ``path`` would not load, in one line (``None``: it loads).

    Cheap, yet it catches a truncated or overwritten file: a file is opened as a torch zip archive and its pickle
    read with ``weights_only=True`` and ``mmap=True`` (no tensor data is read); a sharded FSDP directory needs its
    ``.metadata`` (read by :func:`check_sharded_metadata`), ``*.distcp`` files and a loadable ``meta.pt``.
    """
    path = Path(path)
    try:
        if path.is_dir():
            if not (path / SHARDED_EXTRA).is_file():
                return f"a directory without {SHARDED_EXTRA} (not a sharded checkpoint)"
            if not any(path.glob("*.distcp")):
                return "a sharded checkpoint without *.distcp files"
            check_sharded_metadata(path)
            path = path / SHARDED_EXTRA
        elif os.path.getsize(path) == 0:
            return "an empty file"
        loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # noqa: BLE001 -- any failure to read is the answer
        return _reason(error)
    if not isinstance(loaded, dict):
        return f"holds a {type(loaded).__name__}, not a checkpoint dictionary"
    return None



def link_checkpoint(trainer: L.Trainer, filepath: str, linkpath: str) -> None:
    """``ModelCheckpoint(save_last="link")``'s step, atomic: ``linkpath`` becomes a link to ``filepath`` (a copy
    where links are not supported) in one rename, never missing nor half-copied."""
    if trainer.is_global_zero and os.path.abspath(filepath) != os.path.abspath(linkpath):
        link_or_copy(filepath, linkpath)
    trainer.strategy.barrier()


def use_atomic_checkpoints(trainer: L.Trainer) -> None:
    """Make ``trainer`` save through :class:`AtomicCheckpointIO` (unless it was given a ``CheckpointIO`` of its
    own) and link ``save_last="link"`` checkpoints with :func:`link_checkpoint`."""
    if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
        trainer.strategy.checkpoint_io = AtomicCheckpointIO()
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.save_last == "link":
            callback._link_checkpoint = link_checkpoint
