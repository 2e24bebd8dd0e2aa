"""Which checkpoint ``fit --ckpt_path last`` resumes from after a SLURM requeue.

Lightning's ``ckpt_path="last"`` looks only at the ``last*.ckpt`` files of the ``ModelCheckpoint`` callbacks, while
the checkpoint written by SLURM auto-requeue (``SIGUSR1`` shortly before the time limit) is
``<default_root_dir>/hpc_ckpt_<N>.ckpt``, which Lightning loads only when ``ckpt_path`` is ``None`` (and
``ckpt_path="hpc"`` raises when there is none yet). A job script that always passes ``--ckpt_path last`` must resume
from whichever of the two is newer: the periodic ``last.ckpt`` after a crash or a node failure, the ``hpc``
checkpoint after a time-limit requeue.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

HPC_CHECKPOINT_GLOB = "hpc_ckpt_*.ckpt"


def resume_candidates(trainer: L.Trainer) -> list[Path] | None:
    """The ``last*.ckpt`` files of every ``ModelCheckpoint`` with a local ``dirpath`` and the ``hpc_ckpt_*.ckpt``
    files of ``trainer.default_root_dir``; ``None`` when a checkpoint directory is remote or not yet known
    (then Lightning's own ``last`` lookup applies)."""
    found: list[Path] = []
    for callback in trainer.checkpoint_callbacks:
        if not isinstance(callback, ModelCheckpoint):
            continue
        if callback.dirpath is None or "://" in str(callback.dirpath):
            return None
        pattern = f"{ModelCheckpoint.CHECKPOINT_NAME_LAST}*{ModelCheckpoint.FILE_EXTENSION}"
        found += Path(callback.dirpath).glob(pattern)
    root = str(trainer.default_root_dir)
    if "://" in root:
        return None
    found += Path(root).glob(HPC_CHECKPOINT_GLOB)
    return [path for path in found if path.is_file()]


def newest_resume_checkpoint(trainer: L.Trainer) -> Path | None:
    """The most recently written of :func:`resume_candidates` (``None``: none, or Lightning must decide)."""
    candidates = resume_candidates(trainer)
    if not candidates:
        return None
    return max(candidates, key=lambda path: path.stat().st_mtime)
