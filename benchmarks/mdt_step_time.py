"""Training step time of MDT relative to DiT at the same size and batch, and its dependence on the mask ratio.

    python benchmarks/mdt_step_time.py                      # MDT-S/2 vs DiT-S/2, 32x32x4 latents, batch 8
    python benchmarks/mdt_step_time.py --device cuda --batch 32

Each step is forward + backward + AdamW through the real methods (MDT: full pass + masked pass). Also times the
masked pass alone, to show that hidden tokens are dropped from the encoder (cost ≈ 1 - r of a full pass). The
methods are stepped in interleaved rounds and the median per method is reported, so drift in machine speed
affects all of them alike. Prints a JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from datetime import date

import torch

from maskdiff.backbones import create_backbone
from maskdiff.corruption import MaskedNoise
from maskdiff.methods import DiT, MDT


class StepTimer:
    """One method, its optimizer and a fixed batch; ``step()`` returns the seconds of one training step."""

    def __init__(self, method, batch: int, device) -> None:
        self.method = method.to(device)
        self.optimizer = method.configure_optimizers()
        p = method.patchifier
        self.images = torch.randn(batch, p.channels, p.input_size, p.input_size, device=device)
        self.labels = torch.randint(0, 1000, (batch,), device=device)
        self.device = device

    def step(self) -> float:
        started = time.perf_counter()
        loss = self.method.step_loss(self.images, self.labels).loss
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="S/2")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    timers = {"dit": StepTimer(DiT(backbone=create_backbone(f"DiT-{args.size}"), ema_decay=None), args.batch, device)}
    for ratio in args.ratios:
        for masked_only in (False, True):
            corruption = MaskedNoise(ratio, full_pass=not masked_only)
            method = MDT(backbone=create_backbone(f"MDT-{args.size}"), corruption=corruption, ema_decay=None)
            timers[f"mdt_{'masked_pass_only' if masked_only else 'two_pass'}_r{ratio}"] = StepTimer(method, args.batch, device)
    times = {name: [] for name in timers}
    for round_index in range(args.warmup + args.steps):  # interleaved rounds: machine drift hits every method alike
        for name, timer in timers.items():
            seconds = timer.step()
            if round_index >= args.warmup:
                times[name].append(seconds)
    medians = {name: statistics.median(values) for name, values in times.items()}
    result = {"date": str(date.today()), "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
              "batch": args.batch, "rounds": args.steps, "median_s_per_step": {k: round(v, 4) for k, v in medians.items()},
              "relative_to_dit": {k: round(v / medians["dit"], 3) for k, v in medians.items() if k != "dit"}}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
