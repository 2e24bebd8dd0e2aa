"""Try a new objective without touching the training loop: two ways, both run through the maskdiff CLI.

1. Plug an :class:`~maskdiff.objectives.Objective` by ``class_path`` (here a pseudo-Huber ε loss).
2. Subclass a method and override :meth:`~maskdiff.methods.MaskDiffModule.view_loss` (here: also log the loss
   per timestep bucket, a common diagnostic).

Usage (trains the CPU debug DiT on the embedded digits; any ``maskdiff fit`` flag can be appended):

    python examples/custom_objective.py
    python examples/custom_objective.py --trainer.max_steps 200 --model.init_args.objective.init_args.c 0.03

In YAML, the same objective is selected with
``objective: {class_path: custom_objective.PseudoHuberLoss, init_args: {c: 0.01}}`` when ``examples/`` is on
``PYTHONPATH``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from maskdiff.cli import MaskDiffCLI
from maskdiff.corruption import Corrupted
from maskdiff.diffusion.parameterization import target_for
from maskdiff.methods import DiT
from maskdiff.objectives import DiffusionLoss, ObjectiveOutput, region_mean


class PseudoHuberLoss(DiffusionLoss):
    """``sqrt((pred - target)^2 + c^2) - c`` instead of the squared error (Song & Dhariwal's consistency
    training loss); the learned-variance VLB term of :class:`DiffusionLoss` is kept.

    Args:
        c: transition scale between quadratic and linear behaviour.
        learn_sigma: the backbone also predicts the variance.
    """

    def __init__(self, c: float = 0.01, learn_sigma: bool = True) -> None:
        super().__init__(prediction="eps", learn_sigma=learn_sigma)
        self.c = c

    def forward(self, prediction: torch.Tensor, view: Corrupted) -> ObjectiveOutput:
        standard = super().forward(prediction, view)
        mean_output = self.split(prediction, view)[0]
        alpha, sigma = view.schedule.alpha_sigma(view.t, view.clean)
        target = target_for(self.prediction, view.clean, view.noise, alpha, sigma)
        huber = region_mean(torch.sqrt((mean_output - target) ** 2 + self.c**2) - self.c, None).mean()
        vlb = standard.parts.get("vlb", torch.zeros(()))
        return ObjectiveOutput(loss=huber + self.vlb_weight * vlb, parts={**standard.parts, "pseudo_huber": huber.detach()})


class BucketedDiT(DiT):
    """DiT that also logs its training loss in four timestep buckets (early ... late in the chain)."""

    def view_loss(self, view: Corrupted, labels: torch.Tensor | None) -> ObjectiveOutput:
        output = super().view_loss(view, labels)
        if self.training and view.t is not None:
            bucket = (view.t * 4 // view.schedule.num_steps).float().mean()
            output.parts["t_bucket_mean"] = bucket
        return output


CONFIG = Path(__file__).resolve().parents[1] / "configs" / "dit" / "dit_debug_cpu.yaml"


def main(argv: list[str] | None = None) -> MaskDiffCLI:
    args = [
        "fit",
        "--config", str(CONFIG),
        "--model", f"{__name__}.BucketedDiT",
        "--model.init_args.objective", f"{__name__}.PseudoHuberLoss",
        "--trainer.logger.init_args.name", "custom_objective",
    ]
    return MaskDiffCLI(args=args + list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
