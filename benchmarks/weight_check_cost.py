"""Cost of checking every weight after each optimizer step (the non-finite guard), against the step itself.

    python benchmarks/weight_check_cost.py --size quickstart --batch 64 --repeats 20
    python benchmarks/weight_check_cost.py --size DiT-S/2 --batch 8 --input_size 32

Times (median over ``repeats``) one training step of a DiT method (forward, backward, AdamW, EMA update) and
``first_nonfinite`` over all its parameters (EMA copy included), as ``TrainingGuards.optimizer_step`` runs it.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from maskdiff.backbones import DiT as DiTBackbone
from maskdiff.backbones import create_backbone
from maskdiff.methods import DiT
from maskdiff.methods.guards import first_nonfinite


def median_seconds(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="quickstart", help="quickstart (width 128, depth 4, patch 4) or a registered DiT size")
    parser.add_argument("--input_size", type=int, default=16)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.size == "quickstart":
        backbone = DiTBackbone(input_size=args.input_size, patch_size=4, in_channels=1, hidden_size=128, depth=4,
                               num_heads=4, num_classes=10)
    else:
        backbone = create_backbone(args.size, input_size=args.input_size)
    method = DiT(backbone=backbone, ema_decay=0.999)
    optimizer = torch.optim.AdamW(method.backbone.parameters(), lr=1e-4)
    channels = backbone.patchifier.channels
    images = torch.rand(args.batch, channels, args.input_size, args.input_size) * 2 - 1
    labels = torch.randint(0, backbone.num_classes or 1, (args.batch,))

    def step() -> None:
        optimizer.zero_grad()
        method.step_loss(images, labels if backbone.num_classes else None).loss.backward()
        optimizer.step()
        method.update_ema()

    def check() -> None:
        assert first_nonfinite(dict(method.named_parameters())) is None

    step()
    step_time, check_time = median_seconds(step, args.repeats), median_seconds(check, args.repeats)
    parameters = sum(p.numel() for p in method.parameters())
    print(f"{args.size}, batch {args.batch}, {parameters / 1e6:.2f} M parameters (EMA included), "
          f"{torch.get_num_threads()} threads: step {step_time * 1e3:.1f} ms, weight check {check_time * 1e3:.2f} ms "
          f"({100 * check_time / step_time:.2f} % of the step)")


if __name__ == "__main__":
    main()
