"""Linear probe of a pre-trained encoder on the digits, next to two baselines measured in the same run.

    maskdiff fit --config configs/mae/mae_digits.yaml                     # pre-train (no labels are used)
    python benchmarks/digits_probe.py --ckpt runs/mae_digits/checkpoints/last.ckpt --data configs/mae/mae_digits.yaml

Rows: the checkpoint's frozen features; the same architecture freshly initialised (seeded); logistic regression on
the raw 8x8 pixels. Every row trains on the digits training split and is scored on the held-out split (the same
seeded split the shards use); pre-training never sees labels or held-out images. Extra checkpoints (e.g. the
quickstart DiT at a timestep) can be added with ``--extra CKPT:POOLING:TIMESTEP``. Prints a table and a JSON line.
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch
from sklearn.linear_model import LogisticRegression

from maskdiff.methods.checkpoints import load_method
from maskdiff.evaluation.digits_judge import load_digits_split
from maskdiff.backbones.features import FeatureSpec
from maskdiff.evaluation.features import extract_dataset_features
from maskdiff.evaluation.linear_probe import load_datamodule, run_linear_probe, train_split_batches


def probe_rows(name: str, module, datamodule, spec: FeatureSpec, args) -> list[dict]:
    """One row per optimizer: features extracted once, the head trained with each optimizer."""
    train = extract_dataset_features(module, train_split_batches(datamodule), spec)
    val = extract_dataset_features(module, datamodule.val_dataloader(), spec)
    rows = []
    for optimizer in args.optimizers:
        started = time.perf_counter()
        result = run_linear_probe(*train, *val, epochs=args.epochs, batch_size=args.batch_size, base_lr=args.base_lr,
                                  optimizer=optimizer, warmup_epochs=args.warmup_epochs, seed=0, num_classes=10)
        rows.append({"row": name, "optimizer": optimizer, "top1": round(result["top1"], 4), "top5": round(result["top5"], 4),
                     "num_train": len(train[1]), "num_val": len(val[1]), "feature_dim": train[0].shape[1],
                     "pooling": spec.pooling, "timestep": spec.timestep, "seconds": round(time.perf_counter() - started, 1)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--data", default="configs/mae/mae_digits.yaml")
    parser.add_argument("--pooling", default="cls", choices=["cls", "mean", "prefix_mean"])
    parser.add_argument("--extra", nargs="*", default=[], help="CKPT:POOLING:TIMESTEP rows to add (TIMESTEP none for MAE-like)")
    parser.add_argument("--epochs", type=int, default=90)
    parser.add_argument("--warmup_epochs", type=int, default=10)
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--base_lr", type=float, default=0.1)
    parser.add_argument("--optimizers", nargs="+", default=["lars", "sgd"], choices=["lars", "sgd"])
    args = parser.parse_args()
    torch.manual_seed(0)
    datamodule = load_datamodule(args.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    module = load_method(args.ckpt).eval()
    spec = FeatureSpec(pooling=args.pooling)
    rows = probe_rows(f"{type(module).__name__} pre-trained", module, datamodule, spec, args)
    random_init = copy.deepcopy(module)
    torch.manual_seed(0)
    random_init.backbone.initialize_weights()
    random_init.ema_backbone = None
    rows += probe_rows(f"{type(module).__name__} random init (same size)", random_init, datamodule, spec, args)
    for extra in args.extra:
        ckpt, pooling, timestep = extra.split(":")
        other = load_method(ckpt).eval()
        rows += probe_rows(f"{type(other).__name__} ({pooling}, t={timestep})", other, datamodule,
                           FeatureSpec(pooling=pooling, timestep=None if timestep in ("", "none") else int(timestep)), args)
    started = time.perf_counter()
    train_images, train_labels = load_digits_split("train")
    val_images, val_labels = load_digits_split("val")
    pixels = LogisticRegression(max_iter=5000).fit(train_images.flatten(1).numpy(), train_labels.numpy())
    rows.append({"row": "logistic regression on raw 8x8 pixels", "optimizer": "lbfgs", "top1": round(pixels.score(val_images.flatten(1).numpy(), val_labels.numpy()), 4),
                 "top5": None, "num_train": len(train_labels), "num_val": len(val_labels), "feature_dim": 64,
                 "seconds": round(time.perf_counter() - started, 1)})
    print("| features | head optimizer | top-1 | top-5 | train / val | dim |\n|---|---|---|---|---|---|")
    for row in rows:
        top5 = "" if row["top5"] is None else f"{row['top5']:.4f}"
        print(f"| {row['row']} | {row['optimizer']} | {row['top1']:.4f} | {top5} | {row['num_train']} / {row['num_val']} | {row['feature_dim']} |")
    print(json.dumps({"protocol": {"mode": "offline", "epochs": args.epochs, "batch": args.batch_size, "base_lr": args.base_lr,
                                   "warmup_epochs": args.warmup_epochs, "data": args.data}, "rows": rows}))


if __name__ == "__main__":
    main()
