"""The measurements of ``benchmarks/gpu_suite.py``: methods built from their shipped YAMLs, FLOPs counted and
checked against DiT's analytic count, timed training steps, timed DDPM steps, and a one-device FSDP fit with a
sharded save, a resume and the conversion to one file.

Imports only what the GPU machine has (torch, lightning, timm, einops, numpy, pyyaml): no jsonargparse (the YAML's
``class_path``/``init_args`` are instantiated here), no webdataset, av or torch-fidelity (no data modules, no
autoencoder: latent methods take random 32x32x4 latents, so the VAE is not timed).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml
from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters_context
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.utils.data import DataLoader, TensorDataset
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from maskdiff.backbones import DiT as DiTBackbone
from maskdiff.convert.fsdp import consolidate_sharded_checkpoint
from maskdiff.files import save_torch
from maskdiff.methods import DiT, MaskDiffModule
from maskdiff.methods.checkpoints import INSTANTIATOR, load_method, read_checkpoint
from maskdiff.modes import evaluating
from maskdiff.scale import BackboneFSDPStrategy, compile_blocks

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# Parts of a config's model section that the benchmark leaves out: the autoencoder (inputs are pre-encoded latents
# or pixels) and the learning-rate schedule (its cost per step is nil); the optimizer is the config's own.
LEFT_OUT = ("autoencoder", "lr_scheduler")
# CPU sizes of every backbone (the same code paths): depth 2, width 64, a 4x4 patch grid; MDTv2 needs depth >= 2 +
# decode_layer.
TINY_GRID = 4
TINY = {"hidden_size": 64, "depth": 2, "num_heads": 2, "decoder_hidden_size": 64, "decoder_depth": 2,
        "decoder_num_heads": 2}
TINY_MDTV2 = {"depth": 3, "decode_layer": 1}


def _class(class_path: str) -> type:
    module_name, _, class_name = class_path.rpartition(".")
    return getattr(importlib.import_module(module_name), class_name)


def instantiate(spec: Any) -> Any:
    """A config's ``class_path``/``init_args`` tree -> objects, nested ones first; the ``optimizer`` becomes a
    ``functools.partial`` (what LightningCLI makes of an ``OptimizerCallable``: the parameters come later)."""
    if not (isinstance(spec, dict) and "class_path" in spec):
        return spec
    args = {}
    for key, value in (spec.get("init_args") or {}).items():
        if key == "optimizer" and isinstance(value, dict):
            args[key] = functools.partial(_class(value["class_path"]), **(value.get("init_args") or {}))
        else:
            args[key] = instantiate(value)
    return _class(spec["class_path"])(**args)


def model_section(config: str, tiny: bool) -> dict:
    """The ``model`` section of ``configs/<config>`` without :data:`LEFT_OUT`; ``tiny`` shrinks the backbone."""
    model = yaml.safe_load((CONFIGS / config).read_text())["model"]
    model["init_args"] = {key: value for key, value in model["init_args"].items() if key not in LEFT_OUT}
    if tiny:
        backbone = model["init_args"]["backbone"]
        backbone["init_args"].update({key: value for key, value in TINY.items() if key in backbone["init_args"]})
        backbone["init_args"]["input_size"] = TINY_GRID * backbone["init_args"]["patch_size"]
        if backbone["class_path"].endswith("MDTv2"):
            backbone["init_args"].update(TINY_MDTV2)
    return model


def build_method(config: str, tiny: bool, device: torch.device) -> tuple[MaskDiffModule, torch.optim.Optimizer, str]:
    """The method of ``configs/<config>`` (built on the CPU, as the CLI builds it, then moved to ``device``), its
    configured optimizer over the method's weight-decay groups (``configure_optimizers``), and the optimizer's
    class path. Inputs are pre-encoded."""
    method = instantiate(model_section(config, tiny)).to(device)
    method.inputs_pre_encoded = True
    configured = method.configure_optimizers()
    optimizer = configured["optimizer"] if isinstance(configured, dict) else configured
    return method, optimizer, f"{type(optimizer).__module__}.{type(optimizer).__name__}"


def random_batch(method: MaskDiffModule, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Random inputs ``(B, C, H, W)`` in the backbone's input shape (latents or pixels in [-1, 1]) and labels."""
    inputs = (torch.rand(batch, *method.patchifier.sample_shape, device=device) * 2 - 1)
    labels = torch.randint(0, method.backbone.num_classes, (batch,), device=device) if method.conditional else None
    return inputs, labels


def bf16_autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16)


# ---------------------------------------------------------------------------------------------- FLOPs
def dit_forward_macs(backbone: DiTBackbone) -> int:
    """Multiply-adds of one DiT forward per image (the DiT paper's "GFLOPs", one per multiply-add): per block
    ``N·D·(3D + D + 2H) + 2·N²·D + 6·D²`` (qkv, output projection, MLP of width H, QKᵀ and AV, adaLN), plus the
    patch embedding ``N·P·D``, the timestep MLP ``F·D + D²``, the final adaLN ``2·D²`` and output ``N·D·P_out``
    (N tokens of P values, width D, F = 256 timestep frequencies). DiT-XL/2 at 256²: 118.62e9."""
    tokens, values, width = backbone.patchifier.num_tokens, backbone.patchifier.values_per_patch, backbone.hidden_size
    hidden = backbone.blocks[0].mlp.fc1.out_features
    block = tokens * width * (4 * width + 2 * hidden) + 2 * tokens**2 * width + 6 * width**2
    stem = tokens * values * width + backbone.t_embedder.frequency_size * width + width**2
    head = 2 * width**2 + tokens * width * values * backbone.output_parts
    return len(backbone.blocks) * block + stem + head


def forward_flops_per_image(method: MaskDiffModule, batch: tuple, draws: int, device: torch.device) -> float:
    """FLOPs (``FlopCounterMode``: 2 per multiply-add, matmuls and attention) of the training forward of every view
    (``step_loss`` without gradients) per image, averaged over ``draws`` draws of the corruption (MDTv2's mask
    ratio changes per batch). Attention runs as its math form while counting: the counter knows the GPU's fused
    attention kernels but not the CPU's, and the math form's two batched matmuls count the same FLOPs."""
    counts = []
    with torch.no_grad(), bf16_autocast(device), sdpa_kernel(SDPBackend.MATH):
        for draw in range(draws):
            torch.manual_seed(draw)
            with FlopCounterMode(display=False) as counter:
                method.step_loss(*batch)
            counts.append(counter.get_total_flops())
    return sum(counts) / len(counts) / batch[0].shape[0]


# ---------------------------------------------------------------------------------------------- timing
@dataclass
class Steps:
    warmup: int
    timed: int


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step, steps: Steps, device: torch.device) -> tuple[float, float]:
    """``(seconds of the warm-up steps, seconds per timed step)``; CUDA events on a GPU."""
    started = time.perf_counter()
    for _ in range(steps.warmup):
        step()
    synchronize(device)
    warmup_s = time.perf_counter() - started
    if device.type == "cuda":
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        for _ in range(steps.timed):
            step()
        end.record()
        end.synchronize()
        return warmup_s, begin.elapsed_time(end) / 1000 / steps.timed
    started = time.perf_counter()
    for _ in range(steps.timed):
        step()
    return warmup_s, (time.perf_counter() - started) / steps.timed


def measure_training(method: MaskDiffModule, optimizer: torch.optim.Optimizer, batch: tuple, steps: Steps,
                     device: torch.device, checkpointing: bool, compile_kwargs: dict | None) -> dict:
    """Time the method's training step (``training_step`` under bf16 autocast, backward, the optimizer step, the
    EMA update), regionally compiled when ``compile_kwargs`` is given (:func:`compile_blocks`)."""
    method.train()
    method.backbone.set_grad_checkpointing(checkpointing)
    if compile_kwargs is not None:
        compile_blocks(method.backbone, **compile_kwargs)

    def step() -> None:
        with bf16_autocast(device):
            loss = method.training_step(batch, 0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        method.update_ema()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(0)
    warmup_s, step_s = time_steps(step, steps, device)
    record = {"step_s": step_s, "images_per_s": batch[0].shape[0] / step_s, "warmup_s": warmup_s}
    if compile_kwargs is not None:  # the warm-up steps minus what they would take compiled
        record["compile_s"] = max(0.0, warmup_s - steps.warmup * step_s)
    if device.type == "cuda":
        record["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return record


def measure_sampling(method: MaskDiffModule, batch: int, steps: Steps, device: torch.device) -> dict:
    """Time ``steps.timed`` reverse steps (after ``steps.warmup``) of the method's configured sampler from pure noise
    with its configured guidance, on the EMA backbone under bf16 autocast, exactly as ``Sampler.sample`` runs
    them; the full chain's images/s is extrapolated from the mean step time (every step but the last costs the same:
    one guided backbone call on 2B rows and the sampler's update with noise drawn on the CPU generator)."""
    sampler = method.sampler
    denoiser = method.denoiser(use_ema=True)
    respaced = denoiser.schedule.respace(sampler.steps, sampler.spacing)
    shape = (batch, method.patchifier.num_tokens, method.patchifier.values_per_patch)
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, method.backbone.num_classes, (batch,), generator=generator).to(device)
    state = {"x": sampler.randn(shape, generator, device=device), "i": respaced.num_steps - 1}

    def step() -> None:
        state["x"], _ = sampler.step(denoiser, respaced, state["i"], state["x"], labels, generator)
        state["i"] -= 1

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with torch.no_grad(), evaluating(denoiser.backbone), bf16_autocast(device):
        _, step_s = time_steps(step, steps, device)
    if not torch.isfinite(state["x"]).all():
        raise FloatingPointError("the sampling chain holds non-finite values")
    chain_s = step_s * respaced.num_steps
    record = {"sampler": type(sampler).__name__, "chain_steps": respaced.num_steps, "timed_steps": steps.timed,
              "step_s": step_s, "chain_s_extrapolated": chain_s, "images_per_s": batch / chain_s,
              "guidance_scale": denoiser.guidance.scale if denoiser.guidance is not None else None,
              "guided_channels": denoiser.guidance.channels if denoiser.guidance is not None else None}
    if device.type == "cuda":
        record["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return record


# ---------------------------------------------------------------------------------------------- FSDP
class KeepFullWeights(L.Callback):
    """At the end of fitting, gather the full (unsharded) state dict of the FSDP-wrapped method on the CPU."""

    weights: dict[str, torch.Tensor] | None = None

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        self.weights = get_model_state_dict(trainer.strategy.model, options=options)


def fsdp_method(tiny: bool) -> DiT:
    """DiT-S/2 on 32x32x4 latents (tiny: depth 2, width 64, 8x8x4 latents), EMA on, built as LightningCLI builds a
    configured method (its hyperparameters are its config, so ``load_method`` can rebuild it from a checkpoint)."""
    torch.manual_seed(0)
    sizes = {"hidden_size": 64, "depth": 2, "num_heads": 2, "input_size": 2 * TINY_GRID} if tiny else \
        {"hidden_size": 384, "depth": 12, "num_heads": 6, "input_size": 32}
    backbone = {"patch_size": 2, "in_channels": 4, "num_classes": 1000, **sizes}
    config = {"_class_path": "maskdiff.methods.DiT", "ema_decay": 0.9999,
              "backbone": {"class_path": "maskdiff.backbones.DiT", "init_args": backbone}}
    with _given_hyperparameters_context(hparams=config, instantiator=INSTANTIATOR):  # as LightningCLI does
        method = DiT(DiTBackbone(**backbone), ema_decay=config["ema_decay"])
    method.inputs_pre_encoded = True
    return method


def load_converted(path: Path, tiny: bool) -> tuple[dict[str, torch.Tensor], str]:
    """The weights of a converted checkpoint as ``maskdiff sample`` would load them (``load_method``, whose
    rebuilding of the configured method needs jsonargparse); without jsonargparse, read weights-only and loaded
    strictly into a freshly built DiT. Returns the loaded method's state dict and how it was loaded."""
    if importlib.util.find_spec("jsonargparse") is not None:
        return load_method(path).state_dict(), "load_method"
    method = fsdp_method(tiny)
    method.load_state_dict(read_checkpoint(path)["state_dict"], strict=True)
    return method.state_dict(), "read_checkpoint + strict load_state_dict (load_method needs jsonargparse, not installed)"


def fsdp_fit(method: DiT, loader: DataLoader, folder: Path, accelerator: str, max_steps: int,
             ckpt_path: Path | None = None) -> tuple[L.Trainer, KeepFullWeights]:
    keep = KeepFullWeights()
    strategy = BackboneFSDPStrategy(activation_checkpointing=True, state_dict_type="sharded")
    trainer = L.Trainer(accelerator=accelerator, devices=1, strategy=strategy, max_steps=max_steps,
                        precision="bf16-mixed" if accelerator == "gpu" else "32-true", gradient_clip_val=1.0,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=folder, callbacks=[keep])
    trainer.fit(method, train_dataloaders=loader, ckpt_path=ckpt_path)
    return trainer, keep


def fsdp_round_trip(folder: Path, device: torch.device, tiny: bool, batch: int) -> dict:
    """Fit 3 steps under :class:`BackboneFSDPStrategy` (activation checkpointing, sharded checkpoints) on one
    device, save a sharded checkpoint, resume it in a new trainer for 2 more steps, save again, consolidate that
    checkpoint into one file (``maskdiff convert fsdp``'s code path), load it with ``load_method`` and compare its
    weights with the resumed trainer's full weights."""
    accelerator = "gpu" if device.type == "cuda" else "cpu"
    generator = torch.Generator().manual_seed(0)
    side = 2 * TINY_GRID if tiny else 32
    latents = torch.randn(8 * batch, 4, side, side, generator=generator)
    loader = DataLoader(TensorDataset(latents, torch.randint(0, 1000, (8 * batch,), generator=generator)),
                        batch_size=batch)
    started = time.perf_counter()
    first, _ = fsdp_fit(fsdp_method(tiny), loader, folder, accelerator, max_steps=3)
    first.save_checkpoint(folder / "step3.ckpt")
    resumed, keep = fsdp_fit(fsdp_method(tiny), loader, folder, accelerator, max_steps=5,
                             ckpt_path=folder / "step3.ckpt")
    resumed.save_checkpoint(folder / "step5.ckpt")
    checkpoint = consolidate_sharded_checkpoint(folder / "step5.ckpt")
    save_torch(checkpoint, folder / "step5_plain.ckpt")
    loaded, loaded_with = load_converted(folder / "step5_plain.ckpt", tiny)
    full = keep.weights
    differing = sorted(key for key in full if key not in loaded or not torch.equal(loaded[key].float(), full[key].float()))
    initial = fsdp_method(tiny).state_dict()
    trained = [key for key in full if key.startswith("backbone.") and not torch.equal(initial[key], full[key])]
    return {
        "strategy": "BackboneFSDPStrategy(activation_checkpointing=True, state_dict_type='sharded'), "
                    f"{accelerator}, 1 device" + ("" if accelerator == "gpu" else " (gloo; FSDP falls back to NO_SHARD)"),
        "model": f"DiT-{'tiny' if tiny else 'S'}/2 on random {side}x{side}x4 latents, batch {batch}",
        "steps": f"fit 3, save sharded, resume 2 more, save sharded, convert to one file, load ({loaded_with})",
        "sharded_files": sorted(path.name for path in (folder / "step5.ckpt").iterdir()),
        "resumed_global_step": resumed.global_step,
        "converted_global_step": checkpoint.get("global_step"),
        "converted_ema_updates": checkpoint.get("ema_updates"),
        "converted_tensors": len(checkpoint["state_dict"]),
        "loaded_with": loaded_with,
        "weights_compared": len(full),
        "weights_differing": differing[:10],
        "missing_from_converted": sorted(set(full) - set(loaded))[:10],
        "backbone_tensors_changed_by_training": len(trained),
        "seconds": time.perf_counter() - started,
        "ok": not differing and set(full) == set(loaded) and resumed.global_step == 5 and len(trained) > 0,
    }
