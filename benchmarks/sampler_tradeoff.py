"""Sampler trade-off on the digits: sampling speed against the quality each sampler reaches, from one checkpoint.

    python benchmarks/sampler_tradeoff.py                  # the quickstart checkpoint (trained first if missing)
    python benchmarks/sampler_tradeoff.py --ckpt runs/quickstart/checkpoints/last.ckpt --samplers ddpm-250 ddim-50

Without ``--ckpt`` it uses ``runs/quickstart/checkpoints/last.ckpt``, running ``maskdiff fit --config
configs/quickstart.yaml`` first (about 4 minutes on 2 CPU cores) when that file is missing. Each sampler draws one
batch of 300 samples (30 per digit) from the same seed with the EMA weights and CFG 2 (the quickstart's
evaluation setting), timed after a warm-up call; the samples are scored with ``score_digits`` (digits Fréchet
distance to the 300 held-out digits, class consistency). A reference row scores 300 real training digits
(30 per digit, upsampled to the model's size). Prints a markdown table, then a JSON line with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import torch
import torch.nn.functional as F

from maskdiff.callbacks.sample_grid import grid_labels
from maskdiff.methods.checkpoints import load_method
from maskdiff.evaluation.digits_judge import load_digits_split, score_digits
from maskdiff.samplers import ClassifierFreeGuidance, DDIMSampler, DDPMSampler

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART_CONFIG = ROOT / "configs" / "quickstart.yaml"
QUICKSTART_CKPT = ROOT / "runs" / "quickstart" / "checkpoints" / "last.ckpt"
DEFAULT_SAMPLERS = ("ddpm-250", "ddpm-50", "ddim-50", "ddim-25", "ddim-10")


def parse_sampler(spec: str) -> DDPMSampler | DDIMSampler:
    """``ddpm-250`` / ``ddim-50`` -> the sampler with that many respaced steps."""
    kind, _, steps = spec.partition("-")
    if kind not in ("ddpm", "ddim") or not steps.isdigit():
        raise ValueError(f"sampler {spec!r}: expected ddpm-STEPS or ddim-STEPS, e.g. ddim-50")
    return DDPMSampler(int(steps)) if kind == "ddpm" else DDIMSampler(int(steps))


def quickstart_checkpoint() -> tuple[Path, float | None]:
    """The quickstart's last checkpoint and the seconds spent training it (``None`` if it already existed)."""
    if QUICKSTART_CKPT.is_file():
        return QUICKSTART_CKPT, None
    print(f"no {QUICKSTART_CKPT.relative_to(ROOT)}: training the quickstart first (about 4 minutes)", file=sys.stderr)
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "maskdiff.tools.main", "fit", "--config", str(QUICKSTART_CONFIG)], cwd=ROOT, check=True)
    return QUICKSTART_CKPT, time.perf_counter() - started


def real_reference(per_class: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``per_class`` training digits of each class, upsampled bilinearly to ``size``: ``(10·per_class, 1, size, size)``."""
    images, labels = load_digits_split("train")
    chosen = torch.cat([torch.nonzero(labels == digit).flatten()[:per_class] for digit in range(10)])
    upsampled = F.interpolate(images[chosen], size=(size, size), mode="bilinear", align_corners=False)
    return upsampled, labels[chosen]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", help="class-conditional digits checkpoint (default: the quickstart's)")
    parser.add_argument("--samplers", nargs="+", default=list(DEFAULT_SAMPLERS))
    parser.add_argument("--per_class", type=int, default=30)
    parser.add_argument("--cfg_scale", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (pinned for comparable timings)")
    args = parser.parse_args()
    samplers = {spec: parse_sampler(spec) for spec in args.samplers}
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    ckpt, training_seconds = (Path(args.ckpt), None) if args.ckpt else quickstart_checkpoint()
    module = load_method(ckpt).eval()
    if not module.conditional:
        raise ValueError(f"{ckpt} is unconditional; this benchmark scores class consistency and needs a class-conditional model")
    labels = grid_labels(list(range(10)), args.per_class)
    guidance = ClassifierFreeGuidance(args.cfg_scale)
    module.generate(labels[:10], sampler=DDIMSampler(2), guidance=guidance, generator=torch.Generator().manual_seed(args.seed))

    rows = []
    for spec, sampler in samplers.items():
        sampling_started = time.perf_counter()
        images = module.generate(labels, sampler=sampler, guidance=guidance, generator=torch.Generator().manual_seed(args.seed))
        seconds = time.perf_counter() - sampling_started
        score = score_digits(images, labels)
        rows.append({"sampler": spec, "seconds_per_batch": round(seconds, 2), "samples_per_s": round(len(labels) / seconds, 2),
                     "digits_fd": round(score.frechet_distance, 2), "class_consistency": round(score.class_consistency, 3)})
        print(f"{spec}: {seconds:.1f} s, FD {score.frechet_distance:.2f}, consistency {score.class_consistency:.3f}",
              file=sys.stderr)
    real_images, real_labels = real_reference(args.per_class, module.patchifier.input_size * module.autoencoder.downsample)
    real = score_digits(real_images, real_labels)

    print(f"| sampler | s / {len(labels)}-sample batch | samples/s | digits FD ↓ | class consistency ↑ |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['sampler'].upper()} | {row['seconds_per_batch']:.1f} | {row['samples_per_s']:.1f} | "
              f"{row['digits_fd']:.2f} | {row['class_consistency']:.3f} |")
    print(f"| real training digits (reference) | | | {real.frechet_distance:.2f} | {real.class_consistency:.3f} |")
    print(json.dumps({
        "date": str(date.today()), "ckpt": str(ckpt), "training_seconds": training_seconds and round(training_seconds, 1),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
                   f"threads {torch.get_num_threads()}",
        "samples": len(labels), "cfg_scale": args.cfg_scale, "seed": args.seed, "weights": "ema", "rows": rows,
        "real_reference": {"digits_fd": round(real.frechet_distance, 2), "class_consistency": round(real.class_consistency, 3)},
        "judge_accuracy": round(real.judge_accuracy, 4), "wall_seconds": round(time.perf_counter() - started, 1),
    }))


if __name__ == "__main__":
    main()
