"""Whether a checkpoint given to ``fit``/``validate``/``test``/``predict`` holds the model that the config builds.

The config builds the model and ``--ckpt_path`` restores its state: a checkpoint of another method class or another
backbone is refused before anything is built, listing the differing keys, and the other settings in which the
checkpoint differs are named in one warning (the model is built with the config's; the optimizer and scheduler
state still come from the checkpoint). A weights-only start from another run's backbone is ``--weights_from FILE``
(:func:`~maskdiff.methods.checkpoints.start_from_weights`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from maskdiff.errors import CheckpointError
from maskdiff.methods.checkpoints import read_checkpoint

ARCHITECTURE = ("model.class_path", "model.init_args.backbone.")
SHOWN = 6


def flatten(value: Any, prefix: str) -> dict[str, Any]:
    """``value`` (nested dicts) as ``{dotted key: leaf}``, tuples as lists."""
    if isinstance(value, dict) and value:
        return {key: leaf for name, item in value.items() for key, leaf in flatten(item, f"{prefix}.{name}").items()}
    return {prefix: list(value) if isinstance(value, tuple) else value}


def saved_model(path: str | Path, resuming: bool = False) -> dict[str, Any] | None:
    """The model config saved in the Lightning checkpoint file ``path`` as ``{class_path, init_args}`` (``None``: it
    saved none, e.g. a module built outside the CLI). :class:`~maskdiff.errors.CheckpointError` when the file does
    not load, is not a Lightning checkpoint, or, ``resuming`` a fit, holds weights only."""
    expected = "expected a checkpoint written by `maskdiff fit`"
    checkpoint = read_checkpoint(path, expected, mmap=True)
    if not isinstance(checkpoint, dict) or not {"state_dict", "pytorch-lightning_version"} <= set(checkpoint):
        found = (f"keys {sorted(map(str, checkpoint))[:5]}" if isinstance(checkpoint, dict)
                 else type(checkpoint).__name__)
        raise CheckpointError(f"{path} is not a Lightning checkpoint (it holds {found}, no state_dict and "
                              f"pytorch-lightning_version); {expected}",
                              hint="import official weights with `maskdiff convert`, then start from them with "
                                   "--weights_from")
    if resuming and "optimizer_states" not in checkpoint:
        raise CheckpointError(f"{path} holds weights only, no training state to resume from",
                              hint=f"start a new run from its weights with --weights_from {path}")
    hparams = dict(checkpoint.get("hyper_parameters") or {})
    hparams.pop("_instantiator", None)
    if "_class_path" not in hparams:
        return None
    return {"class_path": hparams.pop("_class_path"), "init_args": hparams}


def differences(config_model: dict[str, Any], saved: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{key: (config value, checkpoint value)}`` for the model keys both set differently (``model.class_path``,
    ``model.init_args.backbone.init_args.hidden_size``, ...); a key only one of them has (an option added since)
    is no difference."""
    config, checkpoint = flatten(config_model, "model"), flatten(saved, "model")
    return {key: (config[key], checkpoint[key]) for key in config
            if key in checkpoint and config[key] != checkpoint[key]}


def listed(found: dict[str, tuple[Any, Any]]) -> str:
    """``key: config X, checkpoint Y; ...`` for the first :data:`SHOWN` keys, then how many more."""
    shown = [f"{key}: config {mine!r}, checkpoint {theirs!r}" for key, (mine, theirs) in list(found.items())[:SHOWN]]
    more = f"; and {len(found) - SHOWN} more" if len(found) > SHOWN else ""
    return "; ".join(shown) + more


def check_checkpoint_config(config_model: dict[str, Any] | None, path: str | Path,
                            resuming: bool = False) -> dict[str, tuple[Any, Any]]:
    """Refuse the checkpoint file ``path`` (:func:`saved_model`) for the config's model ``config_model``
    (``{class_path, init_args}``) when its method class or backbone differs, with a
    :class:`~maskdiff.errors.CheckpointError` listing the keys and how to start from its weights instead; return the
    other settings that differ (the config's are used)."""
    saved = saved_model(path, resuming)
    if saved is None or not config_model:
        return {}
    found = differences(config_model, saved)
    architecture = {key: values for key, values in found.items() if key.startswith(ARCHITECTURE)}
    if architecture:
        raise CheckpointError(
            f"--ckpt_path {path} holds another model than the config builds: {listed(architecture)}",
            hint=f"resume with the config the checkpoint was trained with, or start from its backbone weights only "
                 f"with --weights_from {path}",
        )
    return found
