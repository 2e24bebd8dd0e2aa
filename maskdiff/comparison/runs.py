"""The ``maskdiff fit`` configs of a comparison: each method's own recipe with the shared knobs put in.

Every run writes under ``<out>/<method>/<stage>/`` (``pretrain``, ``finetune`` for the class-conditional fine-tune,
``classify`` for the classification fine-tune): its config, logs and ``checkpoints/last.ckpt``. Runs keep only
checkpointing among the callbacks (the comparison evaluates afterwards, the same way for every method) and skip
validation loops.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from maskdiff.comparison.settings import PretrainSettings
from maskdiff.files import write_text

BACKBONE_KNOBS = ("input_size", "patch_size", "hidden_size", "depth", "num_heads")


def read_config(path: str | Path) -> dict[str, Any]:
    """A ``maskdiff fit`` YAML as a dict (ValueError naming the file when it is not one)."""
    config = yaml.safe_load(Path(path).read_text())
    if not isinstance(config, dict) or "model" not in config or "trainer" not in config:
        raise ValueError(f"{path} is not a maskdiff fit config (expected model: and trainer: sections)")
    return config


def run_dir(out: Path, method: str, stage: str) -> Path:
    return out / method / stage


def checkpoint_of(out: Path, method: str, stage: str) -> Path:
    """Where the run ``stage`` of ``method`` leaves its last checkpoint."""
    return run_dir(out, method, stage) / "checkpoints" / "last.ckpt"


def quiet_trainer(config: dict[str, Any], directory: Path, steps: int, seed: int) -> dict[str, Any]:
    """``config`` (a copy) training ``steps`` steps with seed ``seed`` into ``directory``, no validation loop, no
    progress bar, a CSV logger and only a last-checkpoint callback."""
    config = copy.deepcopy(config)
    config["seed_everything"] = seed
    trainer = config["trainer"]
    trainer.update(max_steps=steps, max_epochs=-1, default_root_dir=str(directory), enable_progress_bar=False,
                   enable_model_summary=False, check_val_every_n_epoch=None, limit_val_batches=0, val_check_interval=None,
                   num_sanity_val_steps=0)
    trainer["logger"] = {"class_path": "lightning.pytorch.loggers.CSVLogger",
                         "init_args": {"save_dir": str(directory), "name": "logs"}}
    trainer["callbacks"] = [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                             "init_args": {"dirpath": str(directory / "checkpoints"), "save_last": True,
                                           "every_n_train_steps": steps}}]
    scheduler = config["model"]["init_args"].get("lr_scheduler")
    if isinstance(scheduler, dict) and "total_steps" in scheduler.get("init_args", {}):
        scheduler["init_args"]["total_steps"] = steps
    return config


def set_backbone_size(config: dict[str, Any], shared: PretrainSettings) -> None:
    """Put the shared backbone size into ``config``'s backbone (in place)."""
    backbone = config["model"]["init_args"]["backbone"].setdefault("init_args", {})
    backbone.update({knob: getattr(shared, knob) for knob in BACKBONE_KNOBS})


def pretraining_config(base: str | Path, shared: PretrainSettings, directory: Path, seed: int) -> dict[str, Any]:
    """The method's config ``base`` with the shared backbone size, batch, optimizer, schedule, clipping, steps and seed."""
    config = quiet_trainer(read_config(base), directory, shared.steps, seed)
    set_backbone_size(config, shared)
    config["data"].setdefault("init_args", {})["batch_size"] = shared.batch_size
    config["trainer"]["gradient_clip_val"] = shared.gradient_clip_val
    model = config["model"]["init_args"]
    model["optimizer"] = {"class_path": "torch.optim.AdamW",
                          "init_args": {"lr": shared.lr, "betas": list(shared.betas), "weight_decay": shared.weight_decay}}
    model["lr_scheduler"] = {"class_path": "maskdiff.optim.WarmupCosineLR",
                             "init_args": {"warmup_steps": shared.warmup_steps, "total_steps": shared.steps,
                                           "min_lr_ratio": shared.min_lr_ratio}}
    return config


def generative_finetune_config(base: str | Path, shared: PretrainSettings, directory: Path, steps: int, seed: int,
                               init_from: Path) -> dict[str, Any]:
    """A class-conditional fine-tune (``base``: its own recipe) of the pre-training ``init_from``, with the
    pre-training's backbone size and batch."""
    config = quiet_trainer(read_config(base), directory, steps, seed)
    set_backbone_size(config, shared)
    config["data"].setdefault("init_args", {})["batch_size"] = shared.batch_size
    config["model"]["init_args"]["init_from"] = str(init_from)
    return config


def classification_config(base: str | Path, directory: Path, steps: int, seed: int, ckpt: Path,
                          timestep: int | None, batch_size: int) -> dict[str, Any]:
    """The classification fine-tune ``base`` (``maskdiff.methods.FineTune``) of ``ckpt``, read at ``timestep``
    (null for an encoder without timestep conditioning)."""
    config = quiet_trainer(read_config(base), directory, steps, seed)
    config["model"]["init_args"].update(ckpt=str(ckpt), timestep=timestep)
    config["data"].setdefault("init_args", {})["batch_size"] = batch_size
    return config


def write_config(config: dict[str, Any], directory: Path, name: str) -> Path:
    """Write ``config`` as ``directory/name.yaml`` (atomically); returns its path."""
    return write_text(directory / f"{name}.yaml", yaml.safe_dump(config, sort_keys=False))
