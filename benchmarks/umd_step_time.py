"""Training images/s of UMD and its MAE-like / DiT-like baselines (pre-training and fine-tune settings), interleaved.

    python benchmarks/umd_step_time.py --rounds 5 --steps 20

Each variant is built from configs/umd/umd_digits.yaml (+ its overlay) or umd_finetune_digits.yaml exactly as
examples/compare_umd.py builds it; one timed unit is ``steps`` optimizer steps (forward, backward, AdamW) on a fixed
batch of 64 digits-sized images. Variants are timed in turn inside each round, so machine load drifts hit all of
them alike; the median round is reported. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import yaml
from jsonargparse import ArgumentParser

ROOT = Path(__file__).resolve().parents[1]
UMD = ROOT / "configs" / "umd"


def build(config: Path, overlay: Path | None, finetune: bool):
    import sys

    sys.path.insert(0, str(ROOT))
    from examples.compare_umd import merge

    import lightning as L

    model = yaml.safe_load(config.read_text())["model"]
    if overlay is not None:
        extra = yaml.safe_load(overlay.read_text())["model"]
        if finetune:
            extra = {"init_args": {k: v for k, v in extra["init_args"].items() if k == "backbone"}}
        model = merge(model, extra)
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--model", type=L.LightningModule)
    return parser.instantiate_classes(parser.parse_object({"model": model})).model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    variants = {}
    for name, overlay in (("UMD", None), ("MAE-like", UMD / "mae_like_baseline.yaml"), ("DiT-like", UMD / "dit_like_baseline.yaml")):
        variants[f"{name} pre-train"] = build(UMD / "umd_digits.yaml", overlay, False)
        variants[f"{name} fine-tune"] = build(UMD / "umd_finetune_digits.yaml", overlay, True)
    images = torch.rand(args.batch, 1, 16, 16) * 2 - 1
    labels = torch.arange(args.batch) % 10
    optimizers = {name: torch.optim.AdamW(module.parameters(), lr=1e-4) for name, module in variants.items()}
    times: dict[str, list[float]] = {name: [] for name in variants}

    def run(name: str, steps: int) -> float:
        module, optimizer = variants[name], optimizers[name]
        started = time.perf_counter()
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            module.step_loss(images, labels if module.conditional else None).loss.backward()
            optimizer.step()
        return time.perf_counter() - started

    for name in variants:
        run(name, 2)
    for _ in range(args.rounds):
        for name in variants:
            times[name].append(run(name, args.steps))
    print(f"| variant | images/s (median of {args.rounds}) | min–max |")
    print("|---|---:|---:|")
    for name, values in times.items():
        rates = sorted(args.steps * args.batch / v for v in values)
        print(f"| {name} | {statistics.median(rates):.0f} | {rates[0]:.0f}–{rates[-1]:.0f} |")


if __name__ == "__main__":
    main()
