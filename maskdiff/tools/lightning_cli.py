"""LightningCLI with maskdiff's conventions: ``maskdiff fit|validate|test|predict`` and the ``preflight`` parser.

``fit`` checks that its run, checkpoint and log directories are writable before building anything, runs the
preflight (:mod:`maskdiff.launch.preflight`) itself inside a SLURM job, and resolves ``--ckpt_path last`` to the
newest of ``last.ckpt`` and SLURM's ``hpc_ckpt_*.ckpt`` that loads (:mod:`maskdiff.launch.resume`). Every run saves
checkpoints atomically and loads them with ``weights_only=True`` (:mod:`maskdiff.checkpoint_io`), into
``<trainer.default_root_dir>/checkpoints`` unless a ``ModelCheckpoint`` names its ``dirpath``, and never beside another
run's checkpoints unless it resumes (:mod:`maskdiff.launch.directories`); ``lr_monitor`` logs the learning rates
(``lr-<Optimizer>``) whenever there is a logger.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_info

from maskdiff.checkpoint_io import use_atomic_checkpoints
from maskdiff.errors import UserError
from maskdiff.launch.directories import (
    refuse_occupied_checkpoint_directories,
    require_writable_directories,
    root_checkpoint_directories,
    root_log_directories,
    run_directories,
)
from maskdiff.launch.preflight import NAMED_CHECKPOINTS, LaunchConfig, run_preflight
from maskdiff.launch.resume import newest_resume_checkpoint, slurm_resume_checkpoint
from maskdiff.methods.base import MaskDiffModule
from maskdiff.methods.checkpoints import start_from_weights
from maskdiff.methods.training import warn
from maskdiff.tools.checkpoint_config import check_checkpoint_config, listed


class MaskDiffCLI(LightningCLI):
    """LightningCLI with maskdiff's conventions: modules (methods, fine-tuning) and data modules chosen by
    ``class_path``, optimizers injected as callables, configs written into each run's log directory."""

    def __init__(self, args=None, run: bool = True, **kwargs) -> None:
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        super().__init__(
            L.LightningModule,
            L.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            auto_configure_optimizers=False,
            args=args,
            run=run,
            **kwargs,
        )

    def _parse_ckpt_path(self) -> None:
        subcommand = self.config.get("subcommand")
        if subcommand:
            ckpt_path = self.config[subcommand].get("ckpt_path")
            if ckpt_path and ckpt_path not in NAMED_CHECKPOINTS and not Path(ckpt_path).exists():
                raise FileNotFoundError(
                    f"checkpoint not found: {ckpt_path} (--ckpt_path must be an existing file, a sharded FSDP "
                    f"checkpoint directory, or one of {NAMED_CHECKPOINTS})"
                )
            if ckpt_path and Path(ckpt_path).is_file():
                self.check_checkpoint(ckpt_path)

    def check_checkpoint(self, ckpt_path: str | Path) -> None:
        """The config builds the model and the checkpoint file ``ckpt_path`` restores its state (LightningCLI would
        replace the config's model by the checkpoint's): refuse a checkpoint of another method or backbone, listing
        the keys, and name the other settings that differ (:mod:`maskdiff.tools.checkpoint_config`)."""
        subcommand = self.config["subcommand"]
        model = self.config[subcommand].get("model")
        found = check_checkpoint_config(model.as_dict() if model is not None else None, ckpt_path,
                                        resuming=subcommand == "fit")
        if found:
            warn(f"{ckpt_path} was saved with other settings; the model is built with the config's (the optimizer and "
                 f"scheduler state, learning rates included, come from the checkpoint): {listed(found)}")

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument(
            "--weights_from", type=str | None, default=None,
            help="start the method's backbone (and its EMA) from the backbone weights of this maskdiff checkpoint, "
                 "without its optimizer state, step or config (a weights-only start; --ckpt_path resumes a run)",
        )
        parser.add_lightning_class_args(LearningRateMonitor, "lr_monitor")
        parser.set_defaults({"lr_monitor.logging_interval": "step"})

    def after_instantiate_classes(self) -> None:
        """Check the data against the method (image size, channels, classes) before any data is read, and start
        from ``--weights_from``."""
        config = self._subcommand_config()
        if isinstance(self.model, MaskDiffModule) and self.datamodule is not None:
            self.model.check_data(self.datamodule)
        weights = config.get("weights_from")
        if weights is None:
            return
        if not isinstance(self.model, MaskDiffModule):
            raise UserError(f"--weights_from starts a method's backbone, but the model is {type(self.model).__name__}",
                            hint="a fine-tune takes its backbone from --model.init_args.ckpt")
        fresh = start_from_weights(self.model, weights)
        rank_zero_info(f"backbone weights from {weights}; freshly initialised: {', '.join(fresh) or 'nothing'}")

    def _subcommand_config(self):
        return self.config[self.subcommand] if self.subcommand else self.config

    def instantiate_trainer(self, **kwargs) -> L.Trainer:
        """Lightning's trainer, saving checkpoints atomically (:func:`~maskdiff.checkpoint_io.use_atomic_checkpoints`),
        with ``lr_monitor`` (the learning rates logged as ``lr-<Optimizer>``) unless there is no logger or
        ``trainer.callbacks`` has its own ``LearningRateMonitor``."""
        trainer = super().instantiate_trainer(**kwargs)
        use_atomic_checkpoints(trainer)
        monitor = self._subcommand_config_init().get("lr_monitor")
        monitors = [callback for callback in trainer.callbacks if isinstance(callback, LearningRateMonitor)]
        if monitor is not None and (not trainer.loggers or len(monitors) > 1):
            trainer.callbacks.remove(monitor)
        return trainer

    def _subcommand_config_init(self):
        return self.config_init[self.subcommand] if self.subcommand else self.config_init

    def before_instantiate_classes(self) -> None:
        """``fit``: inside a SLURM job (or with a ``SLURMEnvironment`` plugin), run the preflight before building
        anything (errors exit with code 2, warnings are printed); then create the run, checkpoint and log directories,
        an ``OSError`` naming the first that cannot be written. A ``ModelCheckpoint`` without ``dirpath`` writes into
        ``<trainer.default_root_dir>/checkpoints`` (:func:`~maskdiff.launch.directories.root_checkpoint_directories`), and
        a logger that the config files keep in their run directory follows a moved ``default_root_dir``
        (:func:`~maskdiff.launch.directories.root_log_directories`)."""
        if self.subcommand != "fit":
            return
        config = self._subcommand_config()
        root_checkpoint_directories(config)
        for note in root_log_directories(config):
            rank_zero_info(note)
        if "SLURM_JOB_ID" in os.environ or LaunchConfig.from_config(config).slurm_plugin:
            findings = run_preflight(config, launching=True)
            if any(finding.severity == "error" for finding in findings):
                sys.exit(2)
        require_writable_directories(run_directories(config))

    def before_fit(self) -> None:
        """``--ckpt_path last``: resume from the newest of ``last*.ckpt`` and SLURM's ``hpc_ckpt_*.ckpt`` that loads,
        saying which newer ones were skipped and why; without ``--ckpt_path`` in a SLURM job, the newest
        ``hpc_ckpt_*.ckpt`` that loads (Lightning would take the highest, loadable or not). A run that resumes nothing
        refuses a checkpoint directory that holds checkpoints already (:func:`~maskdiff.launch.directories.
        refuse_occupied_checkpoint_directories`)."""
        ckpt_path = self.config_init["fit"].get("ckpt_path")
        if ckpt_path not in ("last", None):
            return
        choice = newest_resume_checkpoint(self.trainer) if ckpt_path == "last" else slurm_resume_checkpoint(self.trainer)
        for line in choice.describe():
            warn(line)
        if ckpt_path is None and choice.path is None:
            refuse_occupied_checkpoint_directories(self._subcommand_config())
        if choice.path is not None:
            self.config_init["fit"]["ckpt_path"] = str(choice.path)
            if choice.path.is_file():
                self.check_checkpoint(choice.path)


class PreflightCLI(MaskDiffCLI):
    """``maskdiff preflight``: parse a ``fit`` command line, run the preflight, exit 0 (no errors) or 2."""

    def _parse_ckpt_path(self) -> None:
        """The preflight reports a missing checkpoint with the other problems and never loads one."""

    def before_instantiate_classes(self) -> None:
        root_checkpoint_directories(self._subcommand_config())
        findings = run_preflight(self._subcommand_config(), launching=False, stream=sys.stdout)
        sys.exit(2 if any(finding.severity == "error" for finding in findings) else 0)
