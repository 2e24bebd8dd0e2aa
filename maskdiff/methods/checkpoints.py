"""Reading and writing maskdiff checkpoints (Lightning format with the CLI's instantiation hparams)."""

from __future__ import annotations

import importlib
import zipfile
from pathlib import Path
from typing import Any

import lightning
import torch

from maskdiff.checkpoint_io import weights_only_refusal
from maskdiff.errors import CheckpointError
from maskdiff.files import save_torch
from maskdiff.methods.base import MaskDiffModule
from maskdiff.methods.guards import first_nonfinite

INSTANTIATOR = "lightning.pytorch.cli.instantiate_module"
EXPECTED = "expected a maskdiff checkpoint written by `maskdiff fit` or `maskdiff convert`"


def require_file(path: str | Path, what: str = "checkpoint") -> Path:
    """``path`` as a Path, or FileNotFoundError naming it."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path} (expected an existing file)")
    return path


def unreadable_reason(path: Path, error: Exception) -> str:
    """Why ``torch.load`` of the file ``path`` failed with ``error``, in words: empty, not a torch file, a truncated
    archive, or a pickle that weights-only loading refuses."""
    with path.open("rb") as handle:
        head = handle.read(16)
    if not head:
        return "the file is empty (0 bytes)"
    if not head.startswith((b"PK", b"\x80")):
        return f"it is not a torch file (it begins with {head!r})"
    refusal = weights_only_refusal(error)
    if refusal is not None:
        return f"it pickles more than tensors and plain data, which weights-only loading refuses ({refusal})"
    text = str(error)
    if "PytorchStreamReader failed" in text or not text.strip():
        return f"its {path.stat().st_size} bytes are not a complete torch archive (truncated or overwritten?)"
    return f"{type(error).__name__}: {text.strip().splitlines()[0]}"


def read_checkpoint(path: str | Path, expected: str = EXPECTED, mmap: bool = False) -> Any:
    """``torch.load`` of the file ``path`` with ``weights_only=True`` (``mmap``: tensors are read when used), or
    :class:`~maskdiff.errors.CheckpointError` naming the file, why it does not load and what was ``expected``."""
    path = require_file(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and zipfile.is_zipfile(path))
    except Exception as error:  # noqa: BLE001 -- torch raises many kinds for a file that is not a checkpoint
        reason = unreadable_reason(path, error)
        raise CheckpointError(f"cannot read {path} as a checkpoint: {reason}; {expected}") from error


def load_method(path: str | Path, map_location: str | torch.device = "cpu"):
    """Rebuild the method (class, components and weights) saved in a maskdiff checkpoint."""
    path = require_file(path)
    checkpoint = read_checkpoint(path)
    hparams = checkpoint.get("hyper_parameters", {}) if isinstance(checkpoint, dict) else {}
    if "_class_path" not in hparams:
        raise ValueError(
            f"{path} is not a maskdiff checkpoint (no hyper_parameters with _class_path); official weights must be "
            "imported first, e.g. `maskdiff convert dit SRC OUT`"
        )
    module_name, _, class_name = hparams["_class_path"].rpartition(".")
    method = getattr(importlib.import_module(module_name), class_name, None)
    if not (isinstance(method, type) and issubclass(method, MaskDiffModule)):
        raise ValueError(f"{path} was saved from {hparams['_class_path']}, which is not a maskdiff method")
    # Load through the saved class: Lightning keeps only the hparams the called class's __init__ accepts.
    module = method.load_from_checkpoint(path, map_location=map_location, weights_only=True)
    refuse_nonfinite(module.state_dict(), path)
    return module


def refuse_nonfinite(state_dict: dict[str, torch.Tensor], path: str | Path) -> None:
    """Refuse a checkpoint whose weights hold a NaN or infinity, naming the file and the first bad tensor."""
    bad = first_nonfinite(state_dict)
    if bad is not None:
        raise ValueError(f"{path} holds non-finite weights (first: {bad}); use an earlier checkpoint of the run")


def write_method_checkpoint(path: str | Path, class_path: str, init_args: dict[str, Any], state_dict: dict[str, torch.Tensor]) -> Path:
    """Write a checkpoint that :func:`load_method` (and ``LightningModule.load_from_checkpoint``) can rebuild.

    ``init_args`` is the method's config as the CLI would save it (components as ``class_path``/``init_args``).
    Weights with a NaN or infinity are refused before anything is written; the file is written atomically.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    bad = first_nonfinite(state_dict)
    if bad is not None:
        raise ValueError(f"refusing to write {path}: the weights hold a NaN or infinity (first: {bad})")
    hparams = {"_class_path": class_path, "_instantiator": INSTANTIATOR, **init_args}
    save_torch(
        {
            "state_dict": state_dict,
            "hyper_parameters": hparams,
            "pytorch-lightning_version": lightning.__version__,
            "global_step": 0,
            "epoch": 0,
        },
        path,
    )
    return path


def start_from_weights(method: MaskDiffModule, path: str | Path, use_ema: bool = True) -> list[str]:
    """Start ``method`` from the backbone weights of another run's checkpoint ``path`` (its EMA copy too): a
    weights-only start that takes no optimizer state, step or config. Returns the parameters the checkpoint lacks
    (see :func:`load_backbone_weights`)."""
    fresh = load_backbone_weights(method.backbone, path, use_ema=use_ema)
    if method.ema_backbone is not None:
        method.ema_backbone.load_state_dict(method.backbone.state_dict())
    return fresh


def load_backbone_weights(backbone: torch.nn.Module, path: str | Path, use_ema: bool = True) -> list[str]:
    """Copy the backbone weights of a maskdiff checkpoint into ``backbone`` (to start a fine-tune from a pre-training).

    The checkpoint's EMA backbone is used when ``use_ema`` and it has one, else its raw backbone. Parameters the
    checkpoint lacks keep their initialisation and are returned by name (e.g. a label embedder added for a
    class-conditional fine-tune of an unconditional pre-training). A tensor whose shape differs, or a checkpoint
    tensor the backbone has no place for, is an error naming it: the two architectures must otherwise match.
    """
    path = require_file(path)
    state = read_checkpoint(path)
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    prefix = "ema_backbone." if use_ema and any(k.startswith("ema_backbone.") for k in state) else "backbone."
    weights = {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}
    if not weights:
        raise ValueError(f"{path} holds no backbone weights (no keys starting with {prefix!r})")
    refuse_nonfinite(weights, path)
    own = backbone.state_dict()
    unexpected = sorted(set(weights) - set(own))
    mismatched = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                  for k, v in weights.items() if k in own and v.shape != own[k].shape]
    if unexpected or mismatched:
        found = [f"unexpected {unexpected[:5]}"] if unexpected else []
        found += [f"shape mismatches {mismatched[:5]}"] if mismatched else []
        raise ValueError(f"{path} does not fit this backbone: {', '.join(found)}")
    backbone.load_state_dict(weights, strict=False)
    return sorted(set(own) - set(weights))
