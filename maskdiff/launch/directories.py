"""The directories a ``fit`` run writes into, checked before anything expensive starts.

A checkpoint directory that cannot be written would otherwise be found at the first save, after the data was read
and the first steps trained. ``fit`` stops on the first unwritable one (:func:`require_writable_directories`, before
the model is built); the preflight lists each as an error finding.

A ``ModelCheckpoint`` without a ``dirpath`` writes into the run's directory, ``<trainer.default_root_dir>/checkpoints``
(:func:`root_checkpoint_directories`), so a run renamed by an overlay or ``--trainer.default_root_dir`` keeps its
checkpoints apart from the base config's, and the directory is the same at every restart of the run (Lightning's own
default, the logger's ``version_N/checkpoints``, is new at every start, so ``--ckpt_path last`` would find nothing).
Loggers follow the run too (:func:`root_log_directories`): a logger that the config files keep in their run
directory (``save_dir/name`` = their ``default_root_dir``) moves with a ``default_root_dir`` changed on the command
line or by an overlay that leaves the logger alone. A run that resumes nothing refuses a checkpoint directory that already holds checkpoints
(:func:`refuse_occupied_checkpoint_directories`): ``ModelCheckpoint`` would save ``last-v1.ckpt`` beside the other
run's ``last.ckpt``, and a later ``--ckpt_path last`` would pick whichever is newer.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import Namespace

from maskdiff.errors import UserError
from maskdiff.files import ensure_writable_directory, writable_directory_problem


def _listed(value: Any) -> list:
    if value is None or isinstance(value, bool):
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _class_name(component: Any) -> str:
    if isinstance(component, (Mapping, Namespace)):
        return str(component.get("class_path", "")).rsplit(".", 1)[-1]
    return ""


def _init_args(component: Any) -> Mapping[str, Any]:
    return (component.get("init_args") or {}) if isinstance(component, Mapping) else {}


CHECKPOINT_SUBDIRECTORY = "checkpoints"


def root_checkpoint_directories(config: Namespace) -> None:
    """Set the ``dirpath`` of every ``ModelCheckpoint`` of the parsed ``fit`` config's ``trainer.callbacks`` that
    has none to ``<trainer.default_root_dir (else the working directory)>/checkpoints``, in place."""
    trainer = config.get("trainer")
    if trainer is None:
        return
    root = str(trainer.get("default_root_dir") or os.getcwd())
    for callback in _listed(trainer.get("callbacks")):
        init_args = callback.get("init_args") if isinstance(callback, Namespace) else None
        if _class_name(callback) == "ModelCheckpoint" and init_args is not None and init_args.get("dirpath") is None:
            init_args["dirpath"] = os.path.join(root, CHECKPOINT_SUBDIRECTORY)


def _files_run_directory(config: Namespace) -> str | None:
    """The ``trainer.default_root_dir`` that the parsed config's ``--config`` files set (the last one that sets it),
    before the command line's overrides; None when none sets it."""
    root = None
    for path in _listed(config.get("config")):
        try:
            content = yaml.safe_load(Path(str(path)).read_text()) or {}
        except (OSError, yaml.YAMLError):
            continue
        trainer = content.get("trainer") if isinstance(content, dict) else None
        if isinstance(trainer, dict) and trainer.get("default_root_dir"):
            root = str(trainer["default_root_dir"])
    return root


def root_log_directories(config: Namespace) -> list[str]:
    """Move every logger of the parsed ``fit`` config whose ``save_dir/name`` is the config files' run directory to
    the run's ``trainer.default_root_dir`` (``save_dir`` its parent, ``name`` its last part), in place, when the two
    differ; returns one note per moved logger. A logger given its own place keeps it."""
    trainer = config.get("trainer")
    files_root = _files_run_directory(config)
    if trainer is None or files_root is None or not trainer.get("default_root_dir"):
        return []
    root = Path(str(trainer["default_root_dir"]))
    if os.path.normpath(files_root) == os.path.normpath(root):
        return []
    notes = []
    for logger in _listed(trainer.get("logger")):
        init_args = logger.get("init_args") if isinstance(logger, Namespace) else None
        if init_args is None or init_args.get("save_dir") is None or init_args.get("name") is None:
            continue
        if os.path.normpath(os.path.join(str(init_args["save_dir"]), str(init_args["name"]))) != os.path.normpath(files_root):
            continue
        init_args["save_dir"], init_args["name"] = str(root.parent), root.name
        notes.append(f"{_class_name(logger)} logs to {root} (the run's default_root_dir), not {files_root}")
    return notes


def refuse_occupied_checkpoint_directories(config: Namespace | Mapping[str, Any]) -> None:
    """``UserError`` naming the first local ``ModelCheckpoint`` ``dirpath`` of a parsed ``fit`` config that already
    holds checkpoints (``*.ckpt`` files or sharded checkpoint directories), unless that callback overwrites them
    (``enable_version_counter: false``); call it for a run that resumes nothing."""
    config = config.as_dict() if isinstance(config, Namespace) else dict(config)
    for callback in _listed((config.get("trainer") or {}).get("callbacks")):
        init_args = _init_args(callback)
        dirpath = init_args.get("dirpath")
        if _class_name(callback) != "ModelCheckpoint" or not dirpath or "://" in str(dirpath):
            continue
        if init_args.get("enable_version_counter") is False:
            continue
        found = sorted(path.name for path in Path(dirpath).glob("*.ckpt"))
        if found:
            shown = ", ".join(found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
            raise UserError(
                f"checkpoint directory {dirpath} already holds another run's checkpoints ({shown}) and this run "
                "resumes nothing; resume that run with --ckpt_path last, or give this one its own "
                "--trainer.default_root_dir (its checkpoints go to <default_root_dir>/checkpoints)"
            )


def run_directories(config: Namespace | Mapping[str, Any]) -> list[tuple[str, str]]:
    """``(what, path)`` of every local directory a parsed ``fit`` config writes into: the run directory
    (``trainer.default_root_dir``, else the working directory), each ``ModelCheckpoint`` ``dirpath`` and each
    logger's ``save_dir``."""
    config = config.as_dict() if isinstance(config, Namespace) else dict(config)
    trainer = config.get("trainer") or {}
    found = [("run directory (trainer.default_root_dir)", str(trainer.get("default_root_dir") or os.getcwd()))]
    for callback in _listed(trainer.get("callbacks")):
        if _class_name(callback) == "ModelCheckpoint" and _init_args(callback).get("dirpath"):
            found.append(("checkpoint directory (ModelCheckpoint dirpath)", str(_init_args(callback)["dirpath"])))
    for logger in _listed(trainer.get("logger")):
        if _init_args(logger).get("save_dir"):
            found.append((f"{_class_name(logger)} save_dir", str(_init_args(logger)["save_dir"])))
    return [(what, path) for what, path in found if "://" not in path]


def unwritable_directories(directories: Sequence[tuple[str, str]]) -> list[str]:
    """One message per directory of ``directories`` that cannot be created or written."""
    problems = (writable_directory_problem(path, what) for what, path in directories)
    return [problem for problem in problems if problem is not None]


def require_writable_directories(directories: Sequence[tuple[str, str]]) -> None:
    """Create each directory if missing; an ``OSError`` naming the first that cannot be written."""
    for what, path in directories:
        ensure_writable_directory(path, what)
