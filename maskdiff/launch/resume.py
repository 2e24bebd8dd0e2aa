"""Which checkpoint ``fit --ckpt_path last`` resumes from after a SLURM requeue.

Lightning's ``ckpt_path="last"`` looks only at the ``last*.ckpt`` files of the ``ModelCheckpoint`` callbacks, while
the checkpoint written by SLURM auto-requeue (``SIGUSR1`` shortly before the time limit) is
``<default_root_dir>/hpc_ckpt_<N>.ckpt``, which Lightning loads only when ``ckpt_path`` is ``None`` (and
``ckpt_path="hpc"`` raises when there is none yet). A job script that always passes ``--ckpt_path last`` must resume
from whichever of the two is newer: the periodic ``last.ckpt`` after a crash or a node failure, the ``hpc``
checkpoint after a time-limit requeue. A newer checkpoint that does not load (truncated, overwritten, empty) is
skipped for the next older one that does, so a requeued job does not fail the same way at every start; so is a
corrupt ``hpc`` checkpoint that Lightning would pick itself in a SLURM job started without ``--ckpt_path``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import ModelCheckpoint

from maskdiff.checkpoint_io import checkpoint_problem, is_sharded_checkpoint

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
    return [path for path in found if path.is_file() or is_sharded_checkpoint(path)]


@dataclass
class ResumeChoice:
    """The checkpoint to resume from (``None``: none, or Lightning must decide) and the newer ones skipped, each
    with why it does not load."""

    path: Path | None = None
    skipped: list[tuple[Path, str]] = field(default_factory=list)

    def describe(self) -> list[str]:
        """One line per skipped checkpoint, naming it, why, and what is resumed instead."""
        instead = f"resuming from {self.path}" if self.path is not None else "no older checkpoint"
        return [f"skipped {path}: it does not load ({reason}); {instead}" for path, reason in self.skipped]


def choose_resume_checkpoint(candidates: list[Path]) -> ResumeChoice:
    """The newest of ``candidates`` that loads (:func:`~maskdiff.checkpoint_io.checkpoint_problem`); ``ValueError``
    when there are some and none loads."""
    choice = ResumeChoice()
    for path in sorted(candidates, key=lambda path: path.stat().st_mtime, reverse=True):
        problem = checkpoint_problem(path)
        if problem is None:
            choice.path = path
            return choice
        choice.skipped.append((path, problem))
    if choice.skipped:
        listed = "; ".join(f"{path} ({reason})" for path, reason in choice.skipped)
        raise ValueError(f"no checkpoint to resume from loads: {listed}")
    return choice


def newest_resume_checkpoint(trainer: L.Trainer) -> ResumeChoice:
    """The newest of :func:`resume_candidates` that loads, and the newer ones skipped (``path`` ``None``: no
    candidate, or Lightning must decide)."""
    candidates = resume_candidates(trainer)
    return choose_resume_checkpoint(candidates) if candidates else ResumeChoice()


def slurm_resume_checkpoint(trainer: L.Trainer) -> ResumeChoice:
    """Without ``--ckpt_path`` in a SLURM job, Lightning resumes from the highest ``hpc_ckpt_<N>.ckpt`` of
    ``trainer.default_root_dir``: the newest of those that loads instead, and the newer ones skipped (``path``
    ``None``: not a SLURM job, a remote directory, or no such checkpoint)."""
    root = str(trainer.default_root_dir)
    if not SLURMEnvironment.detect() or "://" in root:
        return ResumeChoice()
    candidates = [path for path in Path(root).glob(HPC_CHECKPOINT_GLOB) if path.is_file()]
    return choose_resume_checkpoint(candidates) if candidates else ResumeChoice()

