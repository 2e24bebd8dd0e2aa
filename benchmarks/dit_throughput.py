"""Measure DiT training throughput, peak memory and sampling time on the current machine.

    python benchmarks/dit_throughput.py                       # DiT-S/2 on 32x32x4 latents, batch 8
    python benchmarks/dit_throughput.py --backbone DiT-B/2 --batch 16 --device cuda --precision bf16

Training: images/s for forward + backward + AdamW step through the real method (corruption, hybrid loss).
Sampling: seconds per image for DDPM-250 and DDIM-50 at the quickstart's size (16x16x1, patch 4, width 128).
Prints a JSON line with the figures, the command and the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import time
from datetime import date

import torch

from maskdiff.backbones import DiT as DiTBackbone
from maskdiff.backbones import create_backbone
from maskdiff.methods import DiT
from maskdiff.samplers import DDIMSampler, DDPMSampler


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def train_throughput(name: str, input_size: int, channels: int, batch: int, steps: int, warmup: int, device, precision: str) -> dict:
    torch.manual_seed(0)
    method = DiT(backbone=create_backbone(name, input_size=input_size, in_channels=channels), ema_decay=0.9999).to(device)
    optimizer = method.configure_optimizers()
    images = torch.randn(batch, channels, input_size, input_size, device=device)
    labels = torch.randint(0, 1000, (batch,), device=device)
    dtype = torch.bfloat16 if precision == "bf16" else None
    rss_before = peak_memory_mb(device)
    for step in range(warmup + steps):
        if step == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = method.step_loss(images, labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        method.update_ema()
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - started
    return {
        "backbone": name, "input": [channels, input_size, input_size], "batch": batch, "steps": steps,
        "images_per_s": round(batch * steps / elapsed, 2), "s_per_step": round(elapsed / steps, 4),
        "peak_memory_mb": round(peak_memory_mb(device), 1), "peak_rss_before_mb": round(rss_before, 1),
        "params_m": round(sum(p.numel() for p in method.backbone.parameters()) / 1e6, 2),
    }


def sampling_time(device, images: int) -> dict:
    torch.manual_seed(0)
    backbone = DiTBackbone(input_size=16, patch_size=4, in_channels=1, hidden_size=128, depth=4, num_heads=4, num_classes=10)
    method = DiT(backbone=backbone, clip_x0=1.0).to(device).eval()
    labels = torch.arange(images) % 10
    out = {}
    for name, sampler in (("ddpm250", DDPMSampler(250)), ("ddim50", DDIMSampler(50))):
        started = time.perf_counter()
        method.generate(labels, sampler=sampler, generator=torch.Generator().manual_seed(0))
        out[f"{name}_s_per_image"] = round((time.perf_counter() - started) / images, 4)
    out["sampled_images"] = images
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="DiT-S/2")
    parser.add_argument("--input_size", type=int, default=32)
    parser.add_argument("--channels", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--sample_images", type=int, default=100)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    args = parser.parse_args()
    device = torch.device(args.device)
    result = {
        "date": str(date.today()),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, threads {torch.get_num_threads()}"
        + (f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""),
        "precision": args.precision,
        "train": train_throughput(args.backbone, args.input_size, args.channels, args.batch, args.steps, args.warmup, device, args.precision),
        "sample_quickstart_size": sampling_time(device, args.sample_images),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
