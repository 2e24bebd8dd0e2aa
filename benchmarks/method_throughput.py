"""Training throughput of every method at its paper resolution: images/s, eager vs ``torch.compile``, and on a GPU
the model FLOPs utilisation (MFU).

    python benchmarks/method_throughput.py                                  # CPU table: 5 methods, batch 8
    python benchmarks/method_throughput.py --methods dit_s2 mae_b16 --rounds 5 --steps 4
    python benchmarks/method_throughput.py --device cuda --precision bf16 --suite gpu --batch 256 \\
        --activation_checkpointing both                                     # DiT-XL/2, MDT-XL/2, DiffMAE-L/16
    python benchmarks/method_throughput.py --device cpu --precision bf16 --suite gpu --tiny --batch 2 \\
        --activation_checkpointing both                                     # the GPU code path, checked on a CPU

Each method is built from its shipped config (``configs/...``, the ``model`` section: backbone, corruption and
objective as trained), without its autoencoder: latent methods (DiT, MDT) take pre-encoded 32x32x4 latents, as
from latent shards, so the VAE is not timed. A step is the real training step: corruption, every view through the
backbone, objective, backward, AdamW step and EMA update (``step_loss`` + ``update_ema``, as ``training_step``).

Eager and compiled runs use the same model: the backbone's call is switched between eager and a
``torch.compile``d version (inductor), compiled once and warmed up before timing. Rounds are interleaved (every
method and mode once per round, ``--steps`` timed steps each) and the median over rounds is reported, so a busy
machine slows all columns alike. MFU = FLOPs per image (``torch.utils.flop_counter.FlopCounterMode`` over one eager
training step: forward + backward matmuls and attention; recomputation under activation checkpointing is not
counted, as is usual for MFU) x images/s / the GPU's dense bf16 peak (``--peak_tflops``; H100/H200 SXM: 989).
Prints a markdown table and a JSON line.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch
import yaml
from torch.utils.flop_counter import FlopCounterMode

from maskdiff.methods.base import MaskDiffModule

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
CPU_SUITE = {
    "DiT-S/2": "dit/dit_s2_imagenet256.yaml",
    "MDT-S/2": "mdt/mdt_s2_imagenet256.yaml",
    "MAE-B/16": "mae/mae_vit_base_patch16_imagenet.yaml",
    "DiffMAE-B/16": "diffmae/vitb16_imagenet.yaml",
    "UMD-B/4": "umd/umd_b4_imagenet64.yaml",
}
GPU_SUITE = {
    "DiT-XL/2": "dit/dit_xl2_imagenet256.yaml",
    "MDT-XL/2": "mdt/mdt_xl2_imagenet256.yaml",
    "DiffMAE-L/16": "diffmae/vitl16_imagenet.yaml",
}
SKIPPED_PARTS = ("autoencoder", "optimizer", "lr_scheduler", "sampler", "guidance")
TINY = {"hidden_size": 32, "depth": 4, "num_heads": 2, "decoder_hidden_size": 32, "decoder_depth": 2, "decoder_num_heads": 2}


def instantiate(spec):
    """A ``class_path``/``init_args`` tree from a config -> objects (nested components first)."""
    if isinstance(spec, dict) and "class_path" in spec:
        module_name, _, class_name = spec["class_path"].rpartition(".")
        init_args = {key: instantiate(value) for key, value in (spec.get("init_args") or {}).items()}
        return getattr(importlib.import_module(module_name), class_name)(**init_args)
    return spec


def build_method(config: str, tiny: bool) -> MaskDiffModule:
    """The method of ``configs/<config>`` without autoencoder (inputs are pre-encoded) and with its default
    AdamW; ``tiny`` shrinks the backbone's widths and depths (checking the code path on a CPU)."""
    model = yaml.safe_load((CONFIGS / config).read_text())["model"]
    init_args = {key: value for key, value in model["init_args"].items() if key not in SKIPPED_PARTS}
    if tiny:
        backbone_args = init_args["backbone"]["init_args"]
        backbone_args.update({key: value for key, value in TINY.items() if key in backbone_args})
        if "decode_layer" in backbone_args:
            backbone_args["decode_layer"] = 2 if "MDTv2" in init_args["backbone"]["class_path"] else 1
    method = instantiate({"class_path": model["class_path"], "init_args": init_args})
    method.inputs_pre_encoded = True
    return method


def input_batch(method: MaskDiffModule, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    shape = tuple(method.patchifier.sample_shape)
    inputs = torch.randn(batch, *shape, device=device).clamp(-1, 1)
    labels = torch.randint(0, method.backbone.num_classes, (batch,), device=device) if method.conditional else None
    return inputs, labels


class Runner:
    """One method, its optimizer, a fixed batch, and its backbone's eager and compiled calls."""

    def __init__(self, name: str, method: MaskDiffModule, batch: int, device: torch.device, precision: str,
                 compile_mode: str | None) -> None:
        self.name, self.method, self.batch, self.device = name, method.to(device), batch, device
        self.optimizer = method.configure_optimizers()
        self.optimizer = self.optimizer["optimizer"] if isinstance(self.optimizer, dict) else self.optimizer
        self.inputs, self.labels = input_batch(method, batch, device)
        self.dtype = torch.bfloat16 if precision == "bf16" else None
        self.eager_call = None
        self.compiled_call = None
        if compile_mode is not None:
            method.backbone.compile(mode=None if compile_mode == "default" else compile_mode)
            self.compiled_call = method.backbone._compiled_call_impl

    def use(self, compiled: bool, checkpointing: bool) -> None:
        self.method.backbone._compiled_call_impl = self.compiled_call if compiled else self.eager_call
        self.method.backbone.set_grad_checkpointing(checkpointing)

    def step(self) -> None:
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
            loss = self.method.step_loss(self.inputs, self.labels).loss
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.method.update_ema()

    def images_per_s(self, steps: int) -> float:
        self.sync()
        started = time.perf_counter()
        for _ in range(steps):
            self.step()
        self.sync()
        return self.batch * steps / (time.perf_counter() - started)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def flops_per_image(self) -> float:
        self.use(compiled=False, checkpointing=False)
        with FlopCounterMode(display=False) as counter:
            self.step()
        return counter.get_total_flops() / self.batch

    def params_m(self) -> float:
        return sum(p.numel() for p in self.method.backbone.parameters()) / 1e6


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def machine(device: torch.device) -> str:
    described = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"
    if device.type == "cuda":
        described += f", {torch.cuda.get_device_name(device)}"
    return described


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=["cpu", "gpu"], default="cpu", help="cpu: S/B sizes; gpu: XL/L sizes")
    parser.add_argument("--methods", nargs="*", help="subset of the suite's names, e.g. DiT-S/2 MAE-B/16")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are reported")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per mode (after compilation)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--compile_mode", default="default", help="torch.compile mode, or 'none' for eager only")
    parser.add_argument("--activation_checkpointing", choices=["off", "on", "both"], default="off")
    parser.add_argument("--peak_tflops", type=float, default=989.0, help="dense bf16 peak of the GPU (H100/H200 SXM)")
    parser.add_argument("--tiny", action="store_true", help="shrink every backbone (checks the code path)")
    parser.add_argument("--json", help="also write the result to this file")
    args = parser.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    suite = GPU_SUITE if args.suite == "gpu" else CPU_SUITE
    names = args.methods or list(suite)
    unknown = [name for name in names if name not in suite]
    if unknown:
        parser.error(f"unknown method(s) {unknown}; the {args.suite} suite has {list(suite)}")
    compile_mode = None if args.compile_mode == "none" else args.compile_mode
    modes = [(compiled, checkpointing) for compiled in ([False, True] if compile_mode else [False])
             for checkpointing in {"off": [False], "on": [True], "both": [False, True]}[args.activation_checkpointing]]

    runners, compile_s, flops = [], {}, {}
    for name in names:
        torch.manual_seed(0)
        runner = Runner(name, build_method(suite[name], args.tiny), args.batch, device, args.precision, compile_mode)
        flops[name] = runner.flops_per_image()
        for compiled, checkpointing in modes:
            runner.use(compiled, checkpointing)
            started = time.perf_counter()
            for _ in range(args.warmup):
                runner.step()
            runner.sync()
            if compiled:
                compile_s[(name, checkpointing)] = time.perf_counter() - started
            progress(f"{name}: warm (compiled {compiled}, checkpointing {checkpointing}) in {time.perf_counter() - started:.0f} s")
        runners.append(runner)

    rates = {(runner.name, mode): [] for runner in runners for mode in modes}
    for round_index in range(args.rounds):
        for runner in runners:
            for mode in modes:
                runner.use(*mode)
                rates[(runner.name, mode)].append(runner.images_per_s(args.steps))
        progress(f"round {round_index + 1}/{args.rounds}: " + ", ".join(f"{name} {mode}: {values[-1]:.2f}" for (name, mode), values in rates.items()))

    rows = []
    for runner in runners:
        for compiled, checkpointing in modes:
            values = rates[(runner.name, (compiled, checkpointing))]
            median = statistics.median(values)
            row = {
                "method": runner.name, "config": suite[runner.name], "compiled": compiled,
                "activation_checkpointing": checkpointing, "images_per_s": round(median, 3),
                "images_per_s_rounds": [round(v, 3) for v in values], "params_m": round(runner.params_m(), 1),
                "gflops_per_image": round(flops[runner.name] / 1e9, 2),
                "input": list(runner.method.patchifier.sample_shape),
            }
            if compiled:
                row["compile_and_warmup_s"] = round(compile_s[(runner.name, checkpointing)], 1)
            if device.type == "cuda":
                row["mfu"] = round(flops[runner.name] * median / (args.peak_tflops * 1e12), 4)
            rows.append(row)
    for runner in runners:
        eager = {row["activation_checkpointing"]: row["images_per_s"] for row in rows if row["method"] == runner.name and not row["compiled"]}
        for row in rows:
            if row["method"] == runner.name and row["compiled"]:
                row["speedup"] = round(row["images_per_s"] / eager[row["activation_checkpointing"]], 2)

    result = {
        "date": str(date.today()), "machine": machine(device), "device": str(device), "precision": args.precision,
        "batch": args.batch, "steps": args.steps, "rounds": args.rounds, "warmup": args.warmup,
        "compile_mode": args.compile_mode, "tiny": args.tiny, "rows": rows,
    }
    print(markdown(result, device.type == "cuda"))
    print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


def markdown(result: dict, mfu: bool) -> str:
    header = "| method | input | params (M) | GFLOPs/image | compiled | act. ckpt | images/s (median) | speedup |" + (" MFU |" if mfu else "")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for row in result["rows"]:
        cells = [row["method"], "×".join(map(str, row["input"])), row["params_m"], row["gflops_per_image"],
                 "yes" if row["compiled"] else "no", "yes" if row["activation_checkpointing"] else "no",
                 row["images_per_s"], row.get("speedup", "")]
        if mfu:
            cells.append(f"{100 * row['mfu']:.1f}%")
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
