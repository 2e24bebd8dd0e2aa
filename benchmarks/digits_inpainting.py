"""MAE vs DiffMAE inpainting on the digits validation split: the same images, the same seeded 75% random patch masks.

    maskdiff fit --config configs/mae/mae_digits.yaml && maskdiff fit --config configs/diffmae/diffmae_digits.yaml
    python benchmarks/digits_inpainting.py --mae runs/mae_digits/checkpoints/last.ckpt \
        --diffmae runs/diffmae_digits/checkpoints/last.ckpt --steps 100 --samples 4

Metrics, over all inpainted images (300 validation digits, centre-resized to the models' 16x16 as the data pipeline
does): the **masked-region MSE** (pixels in [-1, 1], mean over the generated pixels only; known pixels are pasted back
exactly), the **digits Fréchet distance** of the inpainted images to the real validation digits and their **class
consistency** (the digits judge's argmax equals the digit's true label), both from
:func:`maskdiff.evaluation.digits_judge.score_digits`. For DiffMAE the FD and consistency use its first sample; the
MSE is the mean over its samples, and ``DiffMAE, mean of K samples`` scores their average (an estimate of the
posterior mean that MAE regresses to). ``DiffMAE, 1 step`` is its x̂0 at t = T - 1 from pure noise (:class:`~maskdiff.samplers.first_step.FirstStepSampler`; the "MAE is DiffMAE's first
reverse step" view). Rows for scale: hidden pixels set to the background (-1), to the mean training digit, and the
real digits themselves. Writes a JSON with every number and a PNG panel (rows: digits; columns: original, masked,
MAE, DiffMAE samples) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from maskdiff.methods.checkpoints import load_method
from maskdiff.data.digits import digits_pixels
from maskdiff.evaluation.digits_judge import load_digits_split, score_digits
from maskdiff.inpainting.panels import upscale
from maskdiff.samplers.first_step import FirstStepSampler
from maskdiff.inpainting.masks import fit_square, make_mask
from maskdiff.inpainting.panels import save_panel
from maskdiff.samplers import DDPMSampler


def digits_at(split: str, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The digits ``split`` as ``(images (N, 1, size, size) in [-1, 1], labels (N,))``, resized from their 8x8 shard
    PNG pixels bilinearly (as ``maskdiff inpaint --image digits:IDX`` and the DigitsDataModule do)."""
    images, labels = load_digits_split(split)
    resized = [np.asarray(fit_square(Image.fromarray(digits_pixels(((image[0] + 1) * 8).numpy()), mode="L"), size,
                                     Image.Resampling.BILINEAR)) for image in images]
    return torch.from_numpy(np.stack(resized)).float().unsqueeze(1) / 127.5 - 1.0, labels


def masked_mse(results: torch.Tensor, images: torch.Tensor, masks: torch.Tensor) -> float:
    """Mean squared error over the masked pixels (``masks (N, 1, H, W)`` True), pixels in [-1, 1]."""
    weight = masks.expand_as(images).float()
    return float(((results - images) ** 2 * weight).sum() / weight.sum())


def score_row(name: str, results: list[torch.Tensor], images, masks, labels, seconds: float, **extra) -> dict:
    score = score_digits(results[0], labels)
    mse = [masked_mse(result, images, masks) for result in results]
    return {"row": name, "masked_mse": round(float(np.mean(mse)), 4), "digits_fd": round(score.frechet_distance, 3),
            "class_consistency": round(score.class_consistency, 4), "samples_per_image": len(results),
            "seconds": round(seconds, 1), **extra}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mae", default="runs/mae_digits/checkpoints/last.ckpt")
    parser.add_argument("--diffmae", default="runs/diffmae_digits/checkpoints/last.ckpt")
    parser.add_argument("--mask_ratio", type=float, default=0.75)
    parser.add_argument("--steps", type=int, default=100, help="DDPM steps of DiffMAE's reverse chain")
    parser.add_argument("--samples", type=int, default=4, help="DiffMAE samples per image")
    parser.add_argument("--num_images", type=int, default=None, help="first N validation digits (default: all)")
    parser.add_argument("--panel_digits", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="docs/img/digits_inpainting", help="writes OUT.json and OUT.png")
    args = parser.parse_args()
    if args.samples < 1 or args.steps < 1:
        raise ValueError(f"--samples and --steps must be at least 1, got {args.samples} and {args.steps}")
    torch.manual_seed(args.seed)
    mae, diffmae = load_method(args.mae).eval(), load_method(args.diffmae).eval()
    size, token_pixels = diffmae.patchifier.input_size, diffmae.patchifier.patch_size
    if (mae.patchifier.input_size, mae.patchifier.patch_size) != (size, token_pixels):
        raise ValueError(f"the checkpoints must share input and patch size to share masks: MAE {mae.patchifier}, "
                         f"DiffMAE {diffmae.patchifier}")
    images, labels = digits_at("val", size)
    images, labels = images[: args.num_images], labels[: args.num_images]
    generator = torch.Generator().manual_seed(args.seed)
    masks = torch.stack([make_mask("random", size, args.mask_ratio, token_pixels, generator=generator)
                         for _ in images]).unsqueeze(1)

    rows, shown = [], {}
    started = time.perf_counter()
    mae_results = mae.inpaint(images, masks)
    rows.append(score_row("MAE (one decoder pass)", [mae_results], images, masks, labels, time.perf_counter() - started))
    shown["MAE"] = mae_results

    started = time.perf_counter()
    samples = [diffmae.inpaint(images, masks, sampler=DDPMSampler(args.steps),
                               generator=torch.Generator().manual_seed(1000 * args.seed + k)) for k in range(args.samples)]
    rows.append(score_row(f"DiffMAE (DDPM-{args.steps}, one sample)", samples, images, masks, labels,
                          time.perf_counter() - started))
    average = torch.stack(samples).mean(0)
    rows.append(score_row(f"DiffMAE, mean of {args.samples} samples", [average], images, masks, labels, 0.0))
    started = time.perf_counter()
    one_step = diffmae.inpaint(images, masks, sampler=FirstStepSampler(), generator=torch.Generator().manual_seed(args.seed))
    rows.append(score_row("DiffMAE, 1 step (x̂0 at t = T-1 from pure noise)", [one_step], images, masks, labels,
                          time.perf_counter() - started))

    train_mean = digits_at("train", size)[0].mean(0, keepdim=True)
    rows.append(score_row("baseline: hidden pixels = background (-1)", [torch.where(masks, -1.0, images)], images, masks,
                          labels, 0.0))
    rows.append(score_row("baseline: hidden pixels = mean training digit",
                          [torch.where(masks, train_mean.expand_as(images), images)], images, masks, labels, 0.0))
    rows.append(score_row("reference: the real digits (nothing hidden)", [images], images, masks, labels, 0.0))

    out = Path(args.out)
    panel_rows = []
    for index in range(min(args.panel_digits, len(images))):
        tiles = [images[index], torch.where(masks[index], 0.0, images[index]), mae_results[index]]
        tiles += [sample[index] for sample in samples]
        panel_rows.append((f"digit {int(labels[index])}", upscale(torch.stack(tiles))))
    columns = ["original", "masked", "MAE"] + [f"DiffMAE #{k + 1}" for k in range(args.samples)]
    panel = save_panel(panel_rows, out.with_suffix(".png"), per_row=3 + args.samples, titles=columns)

    report = {
        "benchmark": "digits inpainting, MAE vs DiffMAE",
        "protocol": {"split": "digits validation", "num_images": len(images), "image_size": size,
                     "mask": f"random patches of {token_pixels} px, ratio {args.mask_ratio}, seeded ({args.seed}), "
                             "the same for every row",
                     "pixels": "[-1, 1]", "diffmae_sampler": f"DDPM-{args.steps}", "diffmae_samples": args.samples,
                     "mae": args.mae, "diffmae": args.diffmae,
                     "panel_columns": columns},
        "machine": {"platform": platform.platform(), "threads": torch.get_num_threads(), "torch": torch.__version__},
        "rows": rows,
        "panel": str(panel),
    }
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    print("| method | masked-region MSE ([-1, 1]) | digits FD | class consistency | seconds |\n|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['row']} | {row['masked_mse']:.4f} | {row['digits_fd']:.2f} | {row['class_consistency']:.3f} | "
              f"{row['seconds']} |")
    print(f"wrote {out.with_suffix('.json')} and {panel}")


if __name__ == "__main__":
    main()
