"""MDT's central claim in miniature: does mask latent modelling make a DiT learn faster?

Trains a DiT (configs/quickstart.yaml) and an MDT of the same size (configs/mdt/mdt_digits.yaml: same backbone
width/depth/patch, plus MDT's side block) on the embedded digits with the same data, steps, seed and optimizer,
evaluates both at the same steps (digits Fréchet distance and class consistency from the digits judge, EMA
weights, DDIM-50, fixed noise), and writes a markdown table and a plot (metric against training step).

    python examples/compare_dit_mdt.py                            # 2,000 steps each, evaluated every 250
    python examples/compare_dit_mdt.py --steps 400 --eval_every 100 --out runs/compare_small

Outputs: <out>/comparison.md, <out>/comparison.json, <out>/comparison.png, and each run's logs and checkpoints.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import yaml

from maskdiff.callbacks import DigitsEvaluation
from maskdiff.tools.lightning_cli import MaskDiffCLI
from maskdiff.evaluation.digits_judge import load_digits_judge
from maskdiff.samplers import DDIMSampler

ROOT = Path(__file__).resolve().parents[1]
RUNS = {"DiT": ROOT / "configs" / "quickstart.yaml", "MDT": ROOT / "configs" / "mdt" / "mdt_digits.yaml"}


def run_config(base: Path, out: Path, name: str, steps: int) -> Path:
    """A copy of ``base`` writing under ``out/name`` for ``steps`` steps, without the end-of-fit extras."""
    config = yaml.safe_load(base.read_text())
    trainer = config["trainer"]
    trainer.update(max_steps=steps, default_root_dir=str(out / name), enable_progress_bar=False)
    trainer["logger"]["init_args"].update(save_dir=str(out), name=name)
    trainer["callbacks"] = [cb for cb in trainer["callbacks"] if cb["class_path"].endswith(("ModelCheckpoint", "RunSummary"))]
    for callback in trainer["callbacks"]:
        if callback["class_path"].endswith("ModelCheckpoint"):
            callback["init_args"]["dirpath"] = str(out / name / "checkpoints")
    scheduler = config["model"]["init_args"].get("lr_scheduler")
    if scheduler:
        scheduler["init_args"]["total_steps"] = steps
    path = out / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def train(name: str, config: Path, eval_every: int, per_class: int, cfg_scale: float) -> dict:
    cli = MaskDiffCLI(args=["--config", str(config)], run=False)
    evaluation = DigitsEvaluation(every_n_steps=eval_every, per_class=per_class, sampler=DDIMSampler(50), cfg_scale=cfg_scale)
    cli.trainer.callbacks.append(evaluation)
    started = time.perf_counter()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    wall = time.perf_counter() - started
    return {
        "name": name,
        "params_m": round(sum(p.numel() for p in cli.model.backbone.parameters()) / 1e6, 3),
        "train_s": round(wall - evaluation.seconds, 1),
        "evaluation_s": round(evaluation.seconds, 1),
        "history": [{"step": s, "digits_fd": round(fd, 3), "class_consistency": round(cc, 4)} for s, fd, cc in evaluation.history],
    }


def write_outputs(results: list[dict], out: Path, args) -> None:
    (out / "comparison.json").write_text(json.dumps({"settings": vars(args), "runs": results}, indent=2))
    steps = [row["step"] for row in results[0]["history"]]
    lines = [
        f"DiT vs MDT on digits: {args.steps} steps, eval every {args.eval_every} (DDIM-50, cfg {args.cfg_scale}, "
        f"{10 * args.per_class} samples, EMA weights)",
        "",
        "| step | " + " | ".join(f"{r['name']} FD ↓ | {r['name']} consistency ↑" for r in results) + " |",
        "|---|" + "---|---|" * len(results),
    ]
    for i, step in enumerate(steps):
        cells = []
        for run in results:
            row = run["history"][i]
            cells += [f"{row['digits_fd']:.2f}", f"{row['class_consistency']:.3f}"]
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    lines += ["", "| model | backbone params (M) | training time (s, without evaluation) |", "|---|---|---|"]
    lines += [f"| {r['name']} | {r['params_m']} | {r['train_s']} |" for r in results]
    (out / "comparison.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping the plot (pip install matplotlib)")
        return
    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for run in results:
        xs = [row["step"] for row in run["history"]]
        axes[0].plot(xs, [row["digits_fd"] for row in run["history"]], marker="o", label=run["name"])
        axes[1].plot(xs, [row["class_consistency"] for row in run["history"]], marker="o", label=run["name"])
    axes[0].set(xlabel="training step", ylabel="digits Fréchet distance (lower is better)")
    axes[1].set(xlabel="training step", ylabel="class consistency (higher is better)")
    for axis in axes:
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(out / "comparison.png", dpi=120)
    print(f"wrote {out / 'comparison.md'}, {out / 'comparison.json'} and {out / 'comparison.png'}")


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--eval_every", type=int, default=250)
    parser.add_argument("--per_class", type=int, default=30, help="evaluation samples per digit")
    parser.add_argument("--cfg_scale", type=float, default=2.0)
    parser.add_argument("--out", default="runs/compare_dit_mdt")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    judge_accuracy = load_digits_judge()[1]
    print(f"digits judge: held-out accuracy {judge_accuracy:.4f}")
    results = [train(name, run_config(base, out, name, args.steps), args.eval_every, args.per_class, args.cfg_scale)
               for name, base in RUNS.items()]
    write_outputs(results, out, args)
    return results


if __name__ == "__main__":
    main()
