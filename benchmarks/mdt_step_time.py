"""Training step time of MDT relative to DiT at the same size and batch, and its dependence on the mask ratio.

    python benchmarks/mdt_step_time.py                      # MDT-S/2 vs DiT-S/2, 32x32x4 latents, batch 8
    python benchmarks/mdt_step_time.py --device cuda --batch 32

Each step is forward + backward + AdamW through the real methods (MDT: full pass + masked pass). Also times the
masked pass alone against the full pass, to show that hidden tokens are dropped from the encoder (cost ≈ 1 - r).
Prints a JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from datetime import date

import torch

from maskdiff.backbones import create_backbone
from maskdiff.corruption import MaskedNoise
from maskdiff.methods import DiT, MDT


def seconds_per_step(method, batch: int, steps: int, warmup: int, device) -> float:
    optimizer = method.configure_optimizers()
    p = method.patchifier
    images = torch.randn(batch, p.channels, p.input_size, p.input_size, device=device)
    labels = torch.randint(0, 1000, (batch,), device=device)
    for step in range(warmup + steps):
        if step == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
        loss = method.step_loss(images, labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - started) / steps


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
    dit = DiT(backbone=create_backbone(f"DiT-{args.size}"), ema_decay=None).to(device)
    result = {"date": str(date.today()), "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
              "batch": args.batch, "dit_s_per_step": round(seconds_per_step(dit, args.batch, args.steps, args.warmup, device), 4)}
    for ratio in args.ratios:
        for masked_only in (False, True):
            corruption = MaskedNoise(ratio, full_pass=not masked_only)
            mdt = MDT(backbone=create_backbone(f"MDT-{args.size}"), corruption=corruption, ema_decay=None).to(device)
            key = f"mdt_{'masked_pass_only' if masked_only else 'two_pass'}_r{ratio}"
            result[key + "_s_per_step"] = round(seconds_per_step(mdt, args.batch, args.steps, args.warmup, device), 4)
            result[key + "_vs_dit"] = round(result[key + "_s_per_step"] / result["dit_s_per_step"], 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
