"""UMD's claim in miniature: one pre-training that is good for both representation and generation.

Pre-trains UMD and the paper's MAE-like, DiT-like and MaskDiT-like baselines (the same backbone size, steps, data,
seed and optimizer; baselines differ only in the corruption settings, and MAE-like also in its in-context
conditioning, as in the paper) on the embedded digits without labels; probes each encoder; fine-tunes each
class-conditionally with the same recipe (labels on, mask 0, r = 0.05, AdamW β2 0.999) and judges its samples.

    python examples/compare_umd.py                                 # 1,500 pre-training + 1,000 fine-tuning steps each
    python examples/compare_umd.py --pretrain_steps 300 --finetune_steps 200 --out runs/compare_umd_small

Columns: linear-probe top-1 on the frozen pre-trained encoder (mean of the register tokens, no mask; BN + linear
head with SGD, 90 epochs, all 1,497 training digits) and UMD's 10-shot probe (big_vision's ``fewshot_lsr``:
standardised features, a bias feature, closed-form ridge with the paper's l2 1024; 10 shots instead of 100). Probes
read clean images at t = 0, except for the baselines trained without a noise-free step (DiT-like, MaskDiT-like), which
the paper probes as big_vision's ``noised_predict`` does: the input noised to t = ``--noised_probe_t`` (50) with the
run's schedule and fixed seeded noise, the model at t = 51 (the "probe input" column); digits Fréchet distance and
class consistency after the fine-tune (EMA weights, DDIM-50 η = 1, cfg 2.0, 300 samples); pre-training and
fine-tuning images/s (training steps only).
Outputs: <out>/comparison.md, <out>/comparison.json, and each run's logs and checkpoints.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
import yaml

from maskdiff.callbacks import DigitsEvaluation
from maskdiff.methods.checkpoints import load_method
from maskdiff.tools.lightning_cli import MaskDiffCLI
from maskdiff.evaluation.digits_judge import load_digits_judge
from maskdiff.backbones.features import FeatureSpec
from maskdiff.evaluation.features import extract_dataset_features, resolve_method_spec
from maskdiff.evaluation.few_shot import few_shot_probe
from maskdiff.evaluation.linear_probe import load_datamodule, run_linear_probe, train_split_batches
from maskdiff.samplers import DDIMSampler

ROOT = Path(__file__).resolve().parents[1]
PRETRAIN = ROOT / "configs" / "umd" / "umd_digits.yaml"
FINETUNE = ROOT / "configs" / "umd" / "umd_finetune_digits.yaml"
# name -> the overlay applied to both the pre-training and the fine-tune (configs/umd/*_baseline.yaml)
VARIANTS = {
    "UMD": None,
    "MAE-like": ROOT / "configs" / "umd" / "mae_like_baseline.yaml",
    "DiT-like": ROOT / "configs" / "umd" / "dit_like_baseline.yaml",
    "MaskDiT-like": ROOT / "configs" / "umd" / "maskdit_like_baseline.yaml",
}


def merge(base: dict, overlay: dict) -> dict:
    """``overlay`` merged into a copy of ``base`` (nested dicts merged, everything else replaced)."""
    merged = copy.deepcopy(base)
    for key, value in overlay.items():
        merged[key] = merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return merged


def run_config(base: Path, overlay: Path | None, out: Path, name: str, steps: int, finetune: bool, init_from: Path | None) -> Path:
    """A copy of ``base`` (+ the baseline's overlay, its backbone settings only for the fine-tune) for ``steps`` steps
    writing under ``out/name``, keeping only checkpointing among the callbacks."""
    config = yaml.safe_load(base.read_text())
    if overlay is not None:
        extra = yaml.safe_load(overlay.read_text())
        if finetune:  # the fine-tune recipe sets its own corruption; the architecture must match the pre-training
            extra = {"model": {"init_args": {k: v for k, v in extra["model"]["init_args"].items() if k == "backbone"}}}
        config = merge(config, extra)
    trainer = config["trainer"]
    trainer.update(max_steps=steps, default_root_dir=str(out / name), enable_progress_bar=False, check_val_every_n_epoch=None,
                   limit_val_batches=0)
    trainer["logger"]["init_args"].update(save_dir=str(out), name=name)
    trainer["callbacks"] = [cb for cb in trainer["callbacks"] if cb["class_path"].endswith("ModelCheckpoint")]
    trainer["callbacks"][0]["init_args"].update(dirpath=str(out / name / "checkpoints"), every_n_train_steps=steps)
    model = config["model"]["init_args"]
    model["lr_scheduler"]["init_args"]["total_steps"] = steps
    if init_from is not None:
        model["init_from"] = str(init_from)
    path = out / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def fit(config: Path, evaluation: DigitsEvaluation | None = None) -> tuple[MaskDiffCLI, float]:
    """Fit ``config``; returns the CLI and the training images/s (evaluation time excluded)."""
    cli = MaskDiffCLI(args=["--config", str(config)], run=False)
    if evaluation is not None:
        cli.trainer.callbacks.append(evaluation)
    started = time.perf_counter()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    seconds = time.perf_counter() - started - (evaluation.seconds if evaluation is not None else 0.0)
    images = cli.trainer.global_step * cli.datamodule.batch_size
    return cli, images / seconds


def probe_spec(module, noised_probe_t: int | None) -> FeatureSpec:
    """Register-mean features at t = 0 on clean inputs, or, for a run without a noise-free step (big_vision probes it
    with ``noised_predict``), on inputs noised to ``noised_probe_t`` (model at ``noised_probe_t`` + 1)."""
    if noised_probe_t is not None and module.corruption.no_noise_prob == 0:
        return FeatureSpec(pooling="prefix_mean", noise_t=noised_probe_t, use_ema=False)
    return FeatureSpec(pooling="prefix_mean", timestep=0, use_ema=False)


def probe_encoder(ckpt: Path, data_config: Path, shots: int, l2_reg: float, noised_probe_t: int | None) -> dict:
    """Linear probe (SGD head, all training digits) and ``shots``-shot ``fewshot_lsr`` probe of the register-mean
    features (:func:`probe_spec`)."""
    module = load_method(ckpt).eval()
    datamodule = load_datamodule(str(data_config))
    datamodule.prepare_data()
    datamodule.setup("fit")
    spec = resolve_method_spec(module, probe_spec(module, noised_probe_t))
    train = extract_dataset_features(module, train_split_batches(datamodule), spec)
    val = extract_dataset_features(module, datamodule.val_dataloader(), spec)
    linear = run_linear_probe(*train, *val, epochs=90, batch_size=256, base_lr=0.1, optimizer="sgd", warmup_epochs=10,
                              seed=0, num_classes=10)
    probe_input = "clean, t=0" if spec.noise_t is None else f"noised to t={spec.noise_t}, model t={spec.timestep}"
    return {"probe_input": probe_input, "probe_top1": round(linear["top1"], 4),
            f"{shots}shot_top1": round(few_shot_probe(*train, *val, shots=shots, l2_reg=l2_reg), 4)}


def write_outputs(results: list[dict], out: Path, args) -> None:
    (out / "comparison.json").write_text(json.dumps({"settings": vars(args), "runs": results}, indent=2))
    shots = f"{args.shots}shot_top1"
    lines = [
        f"UMD vs its baselines on digits: {args.pretrain_steps} pre-training + {args.finetune_steps} fine-tuning steps each, "
        f"seed {args.seed}",
        "",
        f"| model | probe input | linear probe top-1 ↑ | {args.shots}-shot probe top-1 ↑ | digits FD ↓ (after fine-tune) "
        "| class consistency ↑ | pre-train images/s | fine-tune images/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['name']} | {r['probe_input']} | {r['probe_top1']:.3f} | {r[shots]:.3f} | {r['digits_fd']:.2f} "
        f"| {r['class_consistency']:.3f} "
        f"| {r['pretrain_images_per_s']:.0f} | {r['finetune_images_per_s']:.0f} |"
        for r in results
    ]
    (out / "comparison.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {out / 'comparison.md'} and {out / 'comparison.json'}")


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrain_steps", type=int, default=1500)
    parser.add_argument("--finetune_steps", type=int, default=1000)
    parser.add_argument("--per_class", type=int, default=30, help="evaluation samples per digit")
    parser.add_argument("--cfg_scale", type=float, default=2.0)
    parser.add_argument("--shots", type=int, default=10, help="examples per class of the few-shot ridge probe")
    parser.add_argument("--l2_reg", type=float, default=1024.0, help="ridge penalty of the few-shot probe (UMD: 1024)")
    parser.add_argument("--noised_probe_t", type=int, default=50,
                        help="probe runs without a noise-free step (DiT-like, MaskDiT-like) on inputs noised to this "
                             "step, the model one step later (the paper's 50 -> 51); -1: probe every run on clean inputs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", nargs="*", choices=list(VARIANTS), help="run only these variants")
    parser.add_argument("--out", default="runs/compare_umd")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    print(f"digits judge: held-out accuracy {load_digits_judge()[1]:.4f}")
    results = []
    for name, overlay in VARIANTS.items():
        if args.only and name not in args.only:
            continue
        tag = name.lower().replace("-", "_")
        torch.manual_seed(args.seed)
        pre_config = run_config(PRETRAIN, overlay, out, f"{tag}_pretrain", args.pretrain_steps, False, None)
        _, pretrain_speed = fit(pre_config)
        pre_ckpt = out / f"{tag}_pretrain" / "checkpoints" / "last.ckpt"
        noised_t = None if args.noised_probe_t < 0 else args.noised_probe_t
        row = {"name": name, **probe_encoder(pre_ckpt, pre_config, args.shots, args.l2_reg, noised_t)}
        ft_config = run_config(FINETUNE, overlay, out, f"{tag}_finetune", args.finetune_steps, True, pre_ckpt)
        sampler = DDIMSampler(50, eta=1.0, spacing="big_vision")
        evaluation = DigitsEvaluation(per_class=args.per_class, sampler=sampler, cfg_scale=args.cfg_scale,
                                      seed=args.seed)
        _, finetune_speed = fit(ft_config, evaluation)
        _, fd, consistency = evaluation.history[-1]
        row.update(digits_fd=round(fd, 3), class_consistency=round(consistency, 4),
                   pretrain_images_per_s=round(pretrain_speed, 1), finetune_images_per_s=round(finetune_speed, 1))
        results.append(row)
        print(row)
    write_outputs(results, out, args)
    return results


if __name__ == "__main__":
    main()
