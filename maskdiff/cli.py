"""The ``maskdiff`` command: LightningCLI's fit/validate/test/predict plus maskdiff's own tools.

    maskdiff fit --config configs/quickstart.yaml [--config more.yaml] [--trainer.max_steps 100]
    maskdiff fit --config configs/quickstart.yaml --print_config
    maskdiff sample --ckpt runs/quickstart/checkpoints/last.ckpt --out grid.png --sampler ddim --steps 50
    maskdiff convert dit DiT-XL-2-256x256.pt dit_xl2.ckpt
    maskdiff shards digits data/digits
    maskdiff inpaint --ckpt runs/quickstart/checkpoints/last.ckpt --image digits:0 --mask_kind half --side left --out panel.png
    maskdiff evaluate --ckpt runs/quickstart/checkpoints/last.ckpt --num_samples 1000 --sampler ddim --steps 50 --out eval/quickstart
    maskdiff probe --ckpt runs/quickstart/checkpoints/last.ckpt --data configs/quickstart.yaml --batch_size 256 --optimizer sgd
    maskdiff preflight --config configs/dit/dit_xl2_imagenet256.yaml --config configs/trainer/slurm.yaml --ckpt_path last

``fit`` runs the preflight (:mod:`maskdiff.launch.preflight`) itself inside a SLURM job, and resolves
``--ckpt_path last`` to the newest of ``last.ckpt`` and SLURM's ``hpc_ckpt_*.ckpt`` (:mod:`maskdiff.launch.resume`).
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from jsonargparse import CLI
from lightning.pytorch.cli import LightningCLI

from maskdiff.evaluation.evaluate import evaluate
from maskdiff.evaluation.linear_probe import probe
from maskdiff.inpainting.cli import inpaint
from maskdiff.launch.preflight import NAMED_CHECKPOINTS, LaunchConfig, run_preflight
from maskdiff.launch.resume import newest_resume_checkpoint


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
        super()._parse_ckpt_path()

    def _subcommand_config(self):
        return self.config[self.subcommand] if self.subcommand else self.config

    def before_instantiate_classes(self) -> None:
        """Inside a SLURM job (or with a ``SLURMEnvironment`` plugin), run the preflight before building anything:
        errors exit with code 2, warnings are printed."""
        if self.subcommand != "fit":
            return
        config = self._subcommand_config()
        if "SLURM_JOB_ID" in os.environ or LaunchConfig.from_config(config).slurm_plugin:
            findings = run_preflight(config, launching=True)
            if any(finding.severity == "error" for finding in findings):
                sys.exit(2)

    def before_fit(self) -> None:
        """``--ckpt_path last``: resume from the newest of ``last*.ckpt`` and SLURM's ``hpc_ckpt_*.ckpt``."""
        if self.config_init["fit"].get("ckpt_path") != "last":
            return
        newest = newest_resume_checkpoint(self.trainer)
        if newest is not None:
            self.config_init["fit"]["ckpt_path"] = str(newest)


class PreflightCLI(MaskDiffCLI):
    """``maskdiff preflight``: parse a ``fit`` command line, run the preflight, exit 0 (no errors) or 2."""

    def _parse_ckpt_path(self) -> None:
        """The preflight reports a missing checkpoint with the other problems and never loads one."""

    def before_instantiate_classes(self) -> None:
        findings = run_preflight(self._subcommand_config(), launching=False, stream=sys.stdout)
        sys.exit(2 if any(finding.severity == "error" for finding in findings) else 0)


# ---------------------------------------------------------------------------------------------- tools
def sample(
    ckpt: str,
    out: str = "samples.png",
    classes: list[int] | None = None,
    per_class: int = 8,
    num: int = 16,
    sampler: Literal["ddpm", "ddim"] = "ddpm",
    steps: int = 250,
    eta: float = 0.0,
    cfg_scale: float | None = None,
    cfg_channels: int | None = None,
    cfg_schedule: Literal["constant", "power_cosine"] = "constant",
    cfg_power: float = 4.0,
    seed: int = 0,
    weights: Literal["ema", "raw"] = "ema",
    device: str = "cpu",
) -> str:
    """Generate a PNG grid from a checkpoint: one row per class, ``per_class`` samples per row.

    Args:
        ckpt: maskdiff checkpoint (from ``fit`` or ``convert``).
        out: PNG path to write.
        classes: classes, one row each (default: the first 10 classes; ignored by unconditional models).
        per_class: samples per row.
        num: samples of an unconditional model.
        sampler: ``ddpm`` (ancestral, respaced) or ``ddim``.
        steps: respaced sampling steps.
        eta: DDIM η (0 = deterministic).
        cfg_scale: classifier-free guidance scale (1 = off); default: the guidance stored with the method
            (e.g. MDT's power-cosine 3.8), or none.
        cfg_channels: guide only the first k channels (official DiT: 3); default all.
        cfg_schedule: ``constant`` or MDT's ``power_cosine``.
        cfg_power: exponent of the power-cosine schedule.
        seed: noise seed; the same seed and weights give the same image.
        weights: ``ema`` or ``raw`` backbone weights.
        device: torch device to sample on.
    """
    from maskdiff.callbacks.sample_grid import grid_labels, save_grid
    from maskdiff.methods.checkpoints import load_method
    from maskdiff.samplers import ClassifierFreeGuidance, DDIMSampler, DDPMSampler

    module = load_method(ckpt, map_location=device).to(device).eval()
    if weights == "ema" and module.ema_backbone is None:
        print(f"note: {ckpt} has no EMA weights; sampling with the raw weights", file=sys.stderr)
    if module.conditional:
        classes = classes if classes is not None else list(range(min(module.backbone.num_classes, 10)))
        labels, per_row = grid_labels(classes, per_class), per_class
    else:
        labels, per_row = None, per_class
    chosen = DDIMSampler(steps, eta) if sampler == "ddim" else DDPMSampler(steps)
    guidance = None if cfg_scale is None else ClassifierFreeGuidance(cfg_scale, cfg_channels, cfg_schedule, cfg_power)
    images = module.generate(
        labels, num=num, sampler=chosen, guidance=guidance, generator=torch.Generator().manual_seed(seed),
        use_ema=weights == "ema",
    )
    path = save_grid(images, out, per_row)
    used = guidance or module.guidance
    described = f"cfg {used.scale} ({used.schedule})" if used is not None and used.active else "no guidance"
    print(f"wrote {path} ({images.shape[0]} samples, {sampler}-{steps}, {described}, seed {seed}, {weights} weights)")
    return str(path)


TOOLS = {"sample": (sample, False), "probe": (probe, False), "inpaint": (inpaint, False), "evaluate": (evaluate, False)}


def _register_subcommand_tools() -> None:
    from maskdiff.convert.cli import CONVERTERS
    from maskdiff.data.cli import SHARD_WRITERS

    TOOLS["convert"] = (CONVERTERS, True)
    TOOLS["shards"] = (SHARD_WRITERS, True)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``maskdiff`` console script; ``argv`` defaults to ``sys.argv[1:]``."""
    args = list(sys.argv[1:] if argv is None else argv)
    _register_subcommand_tools()
    if args and args[0] == "preflight":
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
            PreflightCLI(args=["fit", *args[1:]])
        return
    if args and args[0] in TOOLS:
        component, positional = TOOLS[args[0]]
        CLI({args[0]: component}, args=args, as_positional=positional)
        return
    MaskDiffCLI(args=argv)


if __name__ == "__main__":
    main()
