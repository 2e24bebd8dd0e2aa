"""The GPU benchmark suite: training throughput and model-FLOPs utilisation of DiT-XL/2, MDTv2-XL/2, DiffMAE-L/16 and
UMD-L/2 (eager and compiled, with and without activation checkpointing), DDPM-250 sampling of DiT-XL/2 with
classifier-free guidance, and a one-device FSDP fit with a sharded save, a resume and the conversion to one file.
Writes ``gpu_suite.json`` (rewritten atomically after every configuration: a killed run keeps what it measured)
and ``gpu_suite.md`` into ``--out``.

    PYTHONPATH=. python benchmarks/gpu_suite.py --out runs/gpu_suite                 # one H200: about 5 minutes
    PYTHONPATH=. python benchmarks/gpu_suite.py --out runs/gpu_suite --only 'train.dit_xl2.*' fsdp
    python benchmarks/gpu_suite.py --out /tmp/gpu_suite --device cpu --tiny           # the same code paths, CPU

Training: each method is built from the ``model`` section of its shipped config (backbone, corruption, objective,
optimizer, EMA as trained; no autoencoder: DiT, MDT and UMD take random 32x32x4 latents, DiffMAE random 224²
pixels), at ``--batch`` per device. A step is the method's ``training_step`` under
``torch.autocast("cuda", torch.bfloat16)``, backward, the configured optimizer's step (AdamW; MDTv2: Adan, as
its recipe) and the EMA update; Lightning's loop and the non-finite guards are not in it. Compiled = regional
compilation (``maskdiff.scale.compile_blocks``: each transformer block compiled, identical blocks share the graph),
inductor on a GPU. Activation checkpointing = ``Backbone.set_grad_checkpointing`` (every block recomputed).
All eager configurations, the sampling and the FSDP check run before any compilation, so a run cut short by the
time budget (``--budget_s``: no new configuration starts after it) still holds them.

FLOPs: ``torch.utils.flop_counter.FlopCounterMode`` (2 FLOPs per multiply-add) over the forward of every training
view, per image (averaged over 3 draws of the corruption, 1 when tiny); a training step counts 3x the forward
(forward + backward of weights and activations); the recomputation of activation checkpointing is not counted
(model FLOPs, not hardware FLOPs). DiT-XL/2's count is checked against its paper (118.6 GFLOPs per 256² forward, one per
multiply-add) and against the analytic count (``dit_forward_macs``). MFU = training FLOPs x images/s over the dense
bf16 peak (H200 SXM datasheet 989.4 TFLOP/s); also given as a share of the 790 TFLOP/s bf16 matmul ceiling measured
on this kind of machine.

Without CUDA (or with ``--device cpu``): tiny backbones (depth 2, width 64), batch 4, bf16 autocast on the CPU,
1 warm-up + 1 timed step, compilation with dynamo's ``eager`` backend (tracing, guards and graph reuse are
exercised, no code generation), FSDP over gloo on the CPU (one process: FSDP falls back to NO_SHARD), as
tests/scale does.
"""

from __future__ import annotations

import argparse
import fnmatch
import gc
import importlib.metadata
import math
import platform
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

import lightning
import torch
import torch._dynamo

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_suite_parts import (Steps, build_method, dit_forward_macs, forward_flops_per_image, fsdp_round_trip,  # noqa: E402
                             measure_sampling, measure_training, random_batch)

from maskdiff.files import write_json, write_text  # noqa: E402

MODELS = {  # key: (name, config)
    "dit_xl2": ("DiT-XL/2", "dit/dit_xl2_imagenet256.yaml"),
    "mdtv2_xl2": ("MDTv2-XL/2", "mdt/mdtv2_xl2_imagenet256.yaml"),
    "diffmae_l16": ("DiffMAE-L/16", "diffmae/vitl16_imagenet.yaml"),
    "umd_l2": ("UMD-L/2", "umd/umd_l2_imagenet256_latent.yaml"),
}
MODES = [(False, False), (False, True), (True, False), (True, True)]  # (compiled, activation checkpointing)
PEAK_BF16_TFLOPS = 989.4  # H200 SXM datasheet, dense bf16
MATMUL_CEILING_TFLOPS = 790.0  # the bf16 matmul throughput measured on this kind of machine
DIT_XL2_PAPER_GMACS = 118.6  # DiT paper, Table 4: "GFLOPs" of one 256² forward, one per multiply-add
COMPILE_RESERVE_S = 60  # a model's compiled configurations start only this long before the budget ends


def training_id(key: str, compiled: bool, checkpointing: bool) -> str:
    return f"train.{key}.{'compiled' if compiled else 'eager'}{'.ckpt' if checkpointing else ''}"


def all_ids() -> list[str]:
    ids = [training_id(key, *mode) for key in MODELS for mode in MODES]
    return ids + ["sample.dit_xl2", "fsdp"]


def selected(ids: list[str], only: list[str] | None, skip: list[str] | None) -> list[str]:
    """The ids matching any ``only`` pattern (all without it) and no ``skip`` pattern (shell-style wildcards)."""
    match = lambda name, patterns: any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)  # noqa: E731
    return [name for name in ids if (not only or match(name, only)) and not (skip and match(name, skip))]


class Suite:
    """The run's results, written to ``out`` after every configuration."""

    def __init__(self, args: argparse.Namespace, device: torch.device, ids: list[str]) -> None:
        self.args, self.device, self.started = args, device, time.perf_counter()
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.result = {
            "suite": "maskdiff GPU benchmark suite (benchmarks/gpu_suite.py)",
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": machine(device), "device": str(device), "tiny": args.tiny,
            "settings": {
                "batch_per_device": args.batch, "sampling_batch": args.sampling_batch,
                "warmup_steps": args.warmup, "compiled_warmup_steps": args.compiled_warmup, "timed_steps": args.timed,
                "precision": f"torch.autocast('{device.type}', torch.bfloat16); float32 matmuls TF32 on a GPU",
                "compile": f"regional (each transformer block), backend {args.compile_backend}",
                "training_flops": "3 x forward FLOPs (FlopCounterMode, 2 per multiply-add); recomputation not counted",
                "peak_bf16_tflops": args.peak_tflops, "matmul_ceiling_tflops": MATMUL_CEILING_TFLOPS,
                "budget_s": args.budget_s,
            },
            "flops": {}, "configurations": {name: {"status": "pending"} for name in ids},
        }

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def run(self, name: str, measure) -> dict | None:
        """Run ``measure()`` as configuration ``name`` unless the budget is spent; record its result or error."""
        if name not in self.result["configurations"]:
            return None
        if self.elapsed() > self.args.budget_s:
            return self.record(name, {"status": "skipped", "reason": f"time budget of {self.args.budget_s} s spent"})
        progress(f"{name} ...")
        started = time.perf_counter()
        try:
            record = {"status": "ok", **measure()}
        except Exception as error:  # noqa: BLE001 - one failing configuration (OOM, compile error) is recorded
            record = {"status": "error", "error": f"{type(error).__name__}: {str(error)[:500]}",
                      "traceback": traceback.format_exc()[-2000:]}
        record["wall_s"] = time.perf_counter() - started
        release(self.device)
        progress(f"{name}: {record['status']} in {record['wall_s']:.1f} s"
                 + (f", {record['images_per_s']:.1f} images/s" if "images_per_s" in record else ""))
        return self.record(name, record)

    def record(self, name: str, record: dict) -> dict:
        self.result["configurations"][name] = record
        self.write()
        return record

    def write(self) -> None:
        self.result["elapsed_s"] = self.elapsed()
        write_json(self.out / "gpu_suite.json", self.result)
        write_text(self.out / "gpu_suite.md", markdown(self.result))


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def machine(device: torch.device) -> dict:
    described = {"python": platform.python_version(), "torch": torch.__version__, "lightning": lightning.__version__,
                 "cpu": platform.processor() or platform.machine()}
    if device.type == "cuda":
        described.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                         gpu_memory_gib=torch.cuda.get_device_properties(device).total_memory / 2**30)
    return described


def third_party_distributions() -> dict[str, str]:
    """``{distribution: version}`` of every non-standard-library package imported so far (what the suite needs)."""
    modules = {name.partition(".")[0] for name, module in list(sys.modules.items()) if module is not None}
    modules -= set(sys.stdlib_module_names)
    owners = importlib.metadata.packages_distributions()
    found = {}
    for module in modules:
        for distribution in owners.get(module, []):
            if distribution != "maskdiff":
                try:
                    found[distribution] = importlib.metadata.version(distribution)
                except importlib.metadata.PackageNotFoundError:
                    continue
    return dict(sorted(found.items(), key=lambda item: item[0].lower()))


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def flops_entry(key: str, method, batch: tuple, device: torch.device, tiny: bool) -> dict:
    """The model's counted forward FLOPs per image, and for DiT the analytic and the paper's counts."""
    flops = forward_flops_per_image(method, batch, draws=1 if tiny else 3, device=device)
    entry = {"forward_flops_per_image_counter": flops, "forward_gmacs_per_image": flops / 2 / 1e9,
             "training_flops_per_image": 3 * flops, "counter": "torch.utils.flop_counter.FlopCounterMode"}
    if key == "dit_xl2":
        analytic = dit_forward_macs(method.backbone)
        entry.update(analytic_macs_per_image=analytic, counter_over_2_vs_analytic=flops / 2 / analytic)
        if not tiny:
            entry.update(paper_gmacs=DIT_XL2_PAPER_GMACS, counter_over_2_vs_paper=flops / 2 / 1e9 / DIT_XL2_PAPER_GMACS)
    return entry


def train_model(suite: Suite, key: str, compiled_pass: bool) -> None:
    """Build the model once and run its eager (or compiled) configurations, with and without checkpointing."""
    args, device = suite.args, suite.device
    modes = [mode for mode in MODES if mode[0] == compiled_pass]
    names = [training_id(key, *mode) for mode in modes if training_id(key, *mode) in suite.result["configurations"]]
    if not names:
        return
    if compiled_pass and suite.elapsed() > args.budget_s - COMPILE_RESERVE_S:
        for name in names:
            suite.record(name, {"status": "skipped",
                                "reason": f"less than {COMPILE_RESERVE_S} s of the budget left to compile"})
        return
    label, config = MODELS[key]
    try:
        torch.manual_seed(0)
        method, optimizer, optimizer_name = build_method(config, args.tiny, device)
        batch = random_batch(method, args.batch, device)
        if key not in suite.result["flops"]:
            suite.result["flops"][key] = flops_entry(key, method, batch, device, args.tiny)
    except Exception as error:  # noqa: BLE001
        for name in names:
            suite.record(name, {"status": "error",
                                "error": f"building {label}: {type(error).__name__}: {str(error)[:500]}"})
        release(device)
        return
    if compiled_pass:
        torch._dynamo.reset()  # this model's compilation is timed on its own, not reusing another model's graphs
    flops = suite.result["flops"][key]["training_flops_per_image"]
    params = sum(p.numel() for p in method.backbone.parameters())
    for (compiled, checkpointing), name in zip(modes, names):
        steps = Steps(args.compiled_warmup if compiled else args.warmup, args.timed)
        compile_kwargs = {"backend": args.compile_backend} if compiled else None

        def measure() -> dict:
            record = measure_training(method, optimizer, batch, steps, device, checkpointing, compile_kwargs)
            achieved = flops * record["images_per_s"] / 1e12
            return {"model": label, "config": f"configs/{config}", "compiled": compiled,
                    "activation_checkpointing": checkpointing, "optimizer": optimizer_name,
                    "backbone_params_m": params / 1e6, "input": list(method.patchifier.sample_shape), **record,
                    "model_tflops_per_s": achieved, "mfu": achieved / args.peak_tflops,
                    "share_of_matmul_ceiling": achieved / MATMUL_CEILING_TFLOPS}

        suite.run(name, measure)
    del method, optimizer, batch
    release(device)


def sample_dit(suite: Suite) -> dict:
    torch.manual_seed(0)
    method, _, _ = build_method(MODELS["dit_xl2"][1], suite.args.tiny, suite.device)
    steps = Steps(suite.args.sampling_warmup, suite.args.sampling_timed)
    record = measure_sampling(method, suite.args.sampling_batch, steps, suite.device)
    return {"model": "DiT-XL/2 (EMA backbone)", "batch": suite.args.sampling_batch,
            "note": f"{steps.timed} of the {record['chain_steps']} steps timed (after {steps.warmup} warm-up); "
                    "images/s extrapolated to the whole chain; no VAE decoding", **record}


def fsdp_check(suite: Suite) -> dict:
    try:
        with tempfile.TemporaryDirectory(prefix="gpu_suite_fsdp_") as folder:
            record = fsdp_round_trip(Path(folder), suite.device, suite.args.tiny, batch=4 if suite.args.tiny else 32)
    finally:  # the fits' process group is not left to the compiled configurations
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if not record["ok"]:
        raise AssertionError(f"FSDP round trip failed: {record}")
    return record


def number(value, scale: float = 1.0, digits: int = 1, unit: str = "") -> str:
    """``value x scale`` with ``digits`` decimals and ``unit``, or an empty cell when it was not measured."""
    if value is None or not math.isfinite(value):
        return ""
    return f"{value * scale:.{digits}f}{unit}"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(row) + " |" for row in rows]


def status(record: dict) -> str:
    if record["status"] == "ok":
        return "ok"
    return f"{record['status']}: {record.get('error', record.get('reason', ''))[:80]}"


def markdown(result: dict) -> str:
    """The suite's tables: training, sampling, FSDP, FLOP counts."""
    settings, records = result["settings"], result["configurations"]
    lines = [f"GPU suite, {result['date']}, {result['machine'].get('gpu', result['device'])}, torch "
             f"{result['machine']['torch']}, batch {settings['batch_per_device']} per device, {settings['precision']}"
             + (" (tiny CPU sizes)" if result["tiny"] else ""), ""]
    header = ["configuration", "images/s", "step (ms)", "model TFLOP/s", f"MFU (of {settings['peak_bf16_tflops']})",
              f"of the {settings['matmul_ceiling_tflops']:.0f} ceiling", "peak memory (GiB)", "compile (s)", "status"]
    lines += table(header, [[name, number(r.get("images_per_s")), number(r.get("step_s"), 1000),
                             number(r.get("model_tflops_per_s")), number(r.get("mfu"), 100, unit="%"),
                             number(r.get("share_of_matmul_ceiling"), 100, unit="%"), number(r.get("peak_memory_gib")),
                             number(r.get("compile_s")), status(r)]
                            for name, r in records.items() if name.startswith("train.")])
    sampling = records.get("sample.dit_xl2")
    if sampling is not None:
        name = (f"DiT-XL/2 DDPM-{sampling.get('chain_steps', 250)}, CFG {sampling.get('guidance_scale', '')}, batch "
                f"{sampling.get('batch', settings['sampling_batch'])}")
        lines += [""] + table(["sampling", "images/s", "step (ms)", "chain (s)", "peak memory (GiB)", "status"],
                              [[name, number(sampling.get("images_per_s"), digits=2), number(sampling.get("step_s"), 1000),
                                number(sampling.get("chain_s_extrapolated")), number(sampling.get("peak_memory_gib")),
                                status(sampling)]])
        if "note" in sampling:
            lines += ["", f"{sampling['note']}."]
    fsdp = records.get("fsdp")
    if fsdp is not None and fsdp["status"] == "ok":
        lines += ["", f"FSDP: ok, {fsdp['strategy']}; {fsdp['model']}; {fsdp['steps']}: {fsdp['weights_compared']} "
                      f"tensors identical after the conversion; {fsdp['seconds']:.0f} s."]
    elif fsdp is not None:
        lines += ["", f"FSDP: {status(fsdp)}"]
    rows = []
    for key, entry in result["flops"].items():
        checks = []
        if "counter_over_2_vs_paper" in entry:
            checks.append(f"counter/2 = {entry['counter_over_2_vs_paper']:.4f} x the paper's {entry['paper_gmacs']}")
        if "counter_over_2_vs_analytic" in entry:
            checks.append(f"counter/2 = {entry['counter_over_2_vs_analytic']:.6f} x analytic")
        rows.append([MODELS[key][0], number(entry["forward_flops_per_image_counter"], 1e-9, 2),
                     number(entry["forward_gmacs_per_image"], digits=2),
                     number(entry["training_flops_per_image"], 1e-9), "; ".join(checks)])
    lines += [""] + table(["model", "forward GFLOPs/image (counter)", "forward GMACs/image", "training GFLOPs/image",
                           "check"], rows)
    return "\n".join(lines) + "\n"


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for gpu_suite.json and gpu_suite.md")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action=argparse.BooleanOptionalAction, default=None,
                        help="tiny backbones (default: on the CPU only)")
    parser.add_argument("--only", nargs="+", help=f"configurations to run (shell patterns), of: {' '.join(all_ids())}")
    parser.add_argument("--skip", nargs="+", help="configurations to leave out (shell patterns)")
    parser.add_argument("--batch", type=int, help="training batch per device (default 256; tiny 4)")
    parser.add_argument("--sampling_batch", type=int, help="sampling batch (default 256; tiny 4)")
    parser.add_argument("--warmup", type=int, help="untimed steps per eager configuration (default 2; tiny 1)")
    parser.add_argument("--compiled_warmup", type=int, help="untimed steps per compiled configuration, compilation and "
                        "the dynamic-shape recompilation included (default 3; tiny 1)")
    parser.add_argument("--timed", type=int, help="timed steps per configuration (default 5; tiny 1)")
    parser.add_argument("--sampling_warmup", type=int, default=1)
    parser.add_argument("--sampling_timed", type=int, help="timed sampling steps (default 4; tiny 1)")
    parser.add_argument("--compile_backend", help="torch.compile backend (default: inductor on a GPU, eager on the CPU)")
    parser.add_argument("--peak_tflops", type=float, default=PEAK_BF16_TFLOPS, help="dense bf16 peak of the device")
    parser.add_argument("--budget_s", type=float, default=420.0, help="no configuration starts after this many seconds")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda, but CUDA is not available here (use --device cpu)")
    cpu = not args.device.startswith("cuda")
    args.tiny = cpu if args.tiny is None else args.tiny
    small = args.tiny or cpu
    defaults = {"batch": 4 if small else 256, "sampling_batch": 4 if small else 256, "warmup": 1 if small else 2,
                "compiled_warmup": 1 if small else 3,
                "timed": 1 if small else 5, "sampling_timed": 1 if small else 4, "compile_backend": "eager" if cpu else "inductor"}
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    device = torch.device(args.device)
    ids = selected(all_ids(), args.only, args.skip)
    if not ids:
        raise SystemExit(f"no configuration matches --only {args.only} --skip {args.skip}; the ids are {all_ids()}")
    torch.set_float32_matmul_precision("high")
    # Regional compilation: every block kind, call signature and dynamic-shape variant is a cache entry of the same
    # Module._call_impl code (MDTv2 makes 7 in its first two steps); torch 2.11's default limit of 8 is too close.
    limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    setattr(torch._dynamo.config, limit, max(getattr(torch._dynamo.config, limit), 64))
    suite = Suite(args, device, ids)
    suite.write()
    for key in MODELS:
        train_model(suite, key, compiled_pass=False)
    suite.run("sample.dit_xl2", lambda: sample_dit(suite))
    suite.run("fsdp", lambda: fsdp_check(suite))
    for key in MODELS:
        train_model(suite, key, compiled_pass=True)
    suite.result["imported_distributions"] = third_party_distributions()
    suite.write()
    failed = [name for name, record in suite.result["configurations"].items() if record["status"] != "ok"]
    progress(f"done in {suite.elapsed():.0f} s; {suite.out / 'gpu_suite.json'}, {suite.out / 'gpu_suite.md'}"
             + (f"; not ok: {failed}" if failed else ""))
    return suite.result


if __name__ == "__main__":
    main()
