"""Class consistency of a class-conditional digits checkpoint: the share of samples a digit classifier labels
with the class they were generated for.

    python benchmarks/digits_class_consistency.py --ckpt runs/quickstart/checkpoints/last.ckpt --cfg_scale 2

The classifier is logistic regression on sklearn's 8x8 digits (first 1,500 images; ~0.97 on real images
downsampled from 16x16). Samples are average-pooled to 8x8 and rescaled to the 0..16 range. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression

from maskdiff.methods.checkpoints import load_method
from maskdiff.samplers import ClassifierFreeGuidance, DDIMSampler, DDPMSampler


def digits_classifier() -> LogisticRegression:
    digits = load_digits()
    return LogisticRegression(max_iter=5000).fit(digits.data[:1500], digits.target[:1500])


def consistency(classifier: LogisticRegression, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of ``images (B, 1, H, W)`` in [-1, 1] that the classifier assigns to ``labels (B,)``."""
    small = F.adaptive_avg_pool2d(images.float().clamp(-1, 1), 8)
    features = ((small + 1) / 2 * 16).flatten(1).cpu().numpy()
    return float((classifier.predict(features) == labels.cpu().numpy()).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--per_class", type=int, default=10)
    parser.add_argument("--sampler", choices=["ddpm", "ddim"], default="ddpm")
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--cfg_scale", type=float, nargs="+", default=[1.0, 2.0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--weights", choices=["ema", "raw"], default="ema")
    args = parser.parse_args()
    module = load_method(args.ckpt).eval()
    classifier = digits_classifier()
    labels = torch.arange(10).repeat_interleave(args.per_class)
    sampler = DDPMSampler(args.steps) if args.sampler == "ddpm" else DDIMSampler(args.steps)
    results = {}
    for scale in args.cfg_scale:
        started = time.perf_counter()
        images = module.generate(labels, sampler=sampler, guidance=ClassifierFreeGuidance(scale),
                                 generator=torch.Generator().manual_seed(args.seed), use_ema=args.weights == "ema")
        results[f"cfg_{scale}"] = {"class_consistency": consistency(classifier, images, labels),
                                   "seconds": round(time.perf_counter() - started, 1)}
    real = load_digits()
    real_images = torch.tensor(real.images[1500:], dtype=torch.float32)[:, None] / 8 - 1
    print(json.dumps({"ckpt": args.ckpt, "sampler": f"{args.sampler}-{args.steps}", "weights": args.weights,
                      "samples": len(labels), "seed": args.seed, "results": results,
                      "classifier_on_held_out_real": consistency(classifier, real_images, torch.tensor(real.target[1500:]))}))


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
