"""benchmarks/gpu_suite.py in its CPU mode (tiny backbones, the GPU run's code paths), in a process that cannot
import what the GPU machine lacks: every configuration measured, the FLOP counter equal to DiT's analytic count,
the FSDP round trip exact, the markdown table written."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MISSING_ON_THE_GPU_MACHINE = ("jsonargparse", "webdataset", "torch_fidelity", "av", "braceexpand")
# Hide the packages from imports (a None entry in sys.modules) and from Lightning's and torchmetrics' checks of the
# installed distributions, then run the suite as a script.
RUN_WITHOUT = """
import importlib.metadata, runpy, sys
missing = set(sys.argv[1].split(","))
for name in missing:
    sys.modules[name] = None
from_name = importlib.metadata.Distribution.from_name.__func__
def hidden(cls, name):
    if name.replace("-", "_").lower() in missing:
        raise importlib.metadata.PackageNotFoundError(name)
    return from_name(cls, name)
importlib.metadata.Distribution.from_name = classmethod(hidden)
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""
TRAINING = [f"train.{model}.{mode}{ckpt}" for model in ("dit_xl2", "mdtv2_xl2", "diffmae_l16", "umd_l2")
            for mode in ("eager", "compiled") for ckpt in ("", ".ckpt")]


@pytest.mark.slow  # one run of the whole suite: ~40 s of CPU time, most of it dynamo tracing 4 models' blocks
def test_cpu_mode_measures_every_configuration_without_the_packages_the_gpu_machine_lacks(tmp_path):
    command = [sys.executable, "-c", RUN_WITHOUT, ",".join(MISSING_ON_THE_GPU_MACHINE),
               str(ROOT / "benchmarks" / "gpu_suite.py"), "--out", str(tmp_path), "--device", "cpu"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "MASKDIFF_PROGRESS": "0"})
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_suite.json").read_text())
    configurations = result["configurations"]
    assert sorted(configurations) == sorted([*TRAINING, "sample.dit_xl2", "fsdp"])
    assert {name: record["status"] for name, record in configurations.items()} == dict.fromkeys(configurations, "ok")
    for name in [*TRAINING, "sample.dit_xl2"]:
        assert math.isfinite(configurations[name]["images_per_s"]) and configurations[name]["images_per_s"] > 0
    assert all("compile_s" in configurations[name] for name in TRAINING if ".compiled" in name)
    assert all(configurations[name]["mfu"] > 0 for name in TRAINING)

    flops = result["flops"]
    assert sorted(flops) == ["diffmae_l16", "dit_xl2", "mdtv2_xl2", "umd_l2"]
    assert all(entry["training_flops_per_image"] == 3 * entry["forward_flops_per_image_counter"] > 0
               for entry in flops.values())
    assert abs(flops["dit_xl2"]["counter_over_2_vs_analytic"] - 1) < 1e-6

    fsdp = configurations["fsdp"]
    assert fsdp["resumed_global_step"] == fsdp["converted_global_step"] == 5 and fsdp["weights_differing"] == []
    assert fsdp["weights_compared"] == fsdp["converted_tensors"] and "jsonargparse, not installed" in fsdp["loaded_with"]
    hidden = {"jsonargparse", "webdataset", "torch-fidelity", "av", "braceexpand"}
    assert not set(result["imported_distributions"]) & hidden

    table = (tmp_path / "gpu_suite.md").read_text()
    assert all(f"| {name} |" in table for name in TRAINING) and "DDPM-250" in table and "FSDP: ok" in table
