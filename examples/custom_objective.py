"""Extend maskdiff from your own file, through the maskdiff CLI, without touching the training loop.

1. ``objective`` (the default): a v-prediction objective written from scratch. It declares its
   :class:`~maskdiff.diffusion.Parameterization`, so the method checks it against the other parts when it is built
   and samples from it; a subclass of DiT also logs the loss per timestep bucket (overriding ``view_loss``).
2. ``block``: MAE on the digits with BEiT-style block masking (``configs/maskers/block.yaml``), a masker plugged by
   ``class_path`` into the corruption.

Usage (the embedded digits, on CPU; any ``maskdiff fit`` flag can be appended):

    python examples/custom_objective.py objective --trainer.max_steps 200
    python examples/custom_objective.py block --trainer.max_steps 200

In YAML, the objective is ``objective: {class_path: custom_objective.VelocityLoss}``; a backbone for it outputs one
part (``learn_sigma: false``). The ``maskdiff`` command puts the working directory on ``sys.path`` (as ``python -m``
does), so from ``examples/`` (or wherever your own module lies) no ``PYTHONPATH`` is needed:

    cd examples && maskdiff fit --config ../configs/quickstart.yaml --trainer.default_root_dir runs/velocity \
        --model.init_args.objective custom_objective.VelocityLoss --model.init_args.backbone.init_args.learn_sigma false
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from maskdiff.corruption import Corrupted
from maskdiff.diffusion import Parameterization
from maskdiff.methods import DiT
from maskdiff.objectives import Objective, ObjectiveOutput, region_mean
from maskdiff.tools.lightning_cli import MaskDiffCLI

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


class VelocityLoss(Objective):
    """MSE to the velocity ``v = √ᾱ_t ε - √(1-ᾱ_t) x0`` on every token (Salimans & Ho's v-prediction).

    Declares what the method checks: the loss needs noised views (``needs_noise``), the backbone's single output
    part is read as v when sampling (``parameterization``).
    """

    needs_noise = True
    parameterization = Parameterization("v")

    def forward(self, prediction: torch.Tensor, view: Corrupted) -> ObjectiveOutput:
        alpha, sigma = view.schedule.alpha_sigma(view.t, view.clean)
        target = alpha * view.noise - sigma * view.clean
        loss = region_mean((prediction - target) ** 2, None).mean()
        return ObjectiveOutput(loss=loss, parts={"v_mse": loss.detach()})


class BucketedDiT(DiT):
    """DiT that also logs the mean timestep bucket (0..3, early ... late in the chain) of each training view."""

    def view_loss(self, view: Corrupted, labels: torch.Tensor | None) -> ObjectiveOutput:
        output = super().view_loss(view, labels)
        if self.training and view.t is not None:
            output.parts["t_bucket_mean"] = (view.t * 4 // view.schedule.num_steps).float().mean()
        return output


RUNS = {
    "objective": [
        "--config", str(CONFIGS / "dit" / "dit_debug_cpu.yaml"),
        "--model", f"{__name__}.BucketedDiT",
        "--model.init_args.backbone.init_args.learn_sigma", "false",
        "--model.init_args.objective", f"{__name__}.VelocityLoss",
        "--trainer.logger.init_args.name", "custom_objective",
        "--trainer.default_root_dir", "runs/custom_objective",  # its checkpoints: runs/custom_objective/checkpoints
    ],
    "block": [
        "--config", str(CONFIGS / "mae" / "mae_digits.yaml"),
        "--config", str(CONFIGS / "maskers" / "block.yaml"),
        "--trainer.logger.init_args.name", "mae_block_masking",
        "--trainer.default_root_dir", "runs/mae_block_masking",
    ],
}


def main(argv: list[str] | None = None) -> MaskDiffCLI:
    """``argv``: ``[objective|block, maskdiff fit flags...]``."""
    args = list(sys.argv[1:] if argv is None else argv)
    run = args.pop(0) if args and args[0] in RUNS else "objective"
    return MaskDiffCLI(args=["fit", *RUNS[run], *args])


if __name__ == "__main__":
    main()
