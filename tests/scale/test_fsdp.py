"""BackboneFSDPStrategy: the wrap policy per backbone (CPU), a real FSDP fit with sharded and full checkpoints,
their reload, and the consolidation of a sharded checkpoint for sampling on one device.

The fit tests run on the CPU (FSDP over gloo, one process: FSDP falls back to NO_SHARD, so they check wrapping,
activation checkpointing, clipping, checkpoint formats and conversion) and again on a GPU when one is present
(``gpu`` marker); a two-rank CPU run checks the sharding itself (EMA shards, clipping)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from timm.models.vision_transformer import Block

from maskdiff.backbones import create_backbone
from maskdiff.backbones.diffmae import DiffMAEDecoderBlock
from maskdiff.backbones.dit import DiTBlock
from maskdiff.backbones.mdt import MDTBlock
from maskdiff.backbones.umd import InContextBlock
from maskdiff.methods.checkpoints import load_method
from maskdiff.tools.main import main
from maskdiff.convert.fsdp import consolidate_sharded_checkpoint
from maskdiff.methods import MAE, MDT, UMD, DiffMAE, DiT
from maskdiff.scale import BackboneFSDPStrategy, ShardedNormClipping, block_classes, wrap_classes
from tests.helpers import config_in

LAUNCHER_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK")


@pytest.fixture(autouse=True)
def _no_launcher_state_leaks():
    """In-process fits set the launcher variables and a process group; undo both so that later tests (and their
    subprocesses) do not inherit a port that is still bound."""
    saved = {key: os.environ.get(key) for key in LAUNCHER_VARIABLES}
    yield
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value

TINY = dict(input_size=8, in_channels=1)
BACKBONES = {
    "DiT": (lambda: DiT(create_backbone("DiT-Nano/2", **TINY, num_classes=10)), {DiTBlock}),
    "MDT": (lambda: MDT(create_backbone("MDT-Nano/2", **TINY, num_classes=10)), {MDTBlock}),
    "MDTv2": (lambda: MDT(create_backbone("MDTv2-S/2", **TINY, hidden_size=32, num_heads=2, depth=4, decode_layer=2)), {MDTBlock}),
    "MAE": (lambda: MAE(create_backbone("mae_nano")), {Block}),
    "DiffMAE": (lambda: DiffMAE(create_backbone("diffmae_nano")), {Block, DiffMAEDecoderBlock}),
    "UMD": (lambda: UMD(create_backbone("UMD-Nano/2", **TINY)), {DiTBlock}),
    "UMD in-context": (lambda: UMD(create_backbone("UMD-Nano/2", **TINY, adaln=False)), {InContextBlock}),
}
GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("name", list(BACKBONES))
def test_policy_wraps_and_checkpoints_the_block_classes_of_every_backbone(name):
    build, expected = BACKBONES[name]
    module = build()
    assert block_classes(module) == expected
    assert wrap_classes(module) == expected | {type(module.backbone)}
    blocks = [child for list_name, blocks in module.backbone.named_children() if list_name.endswith("blocks")
              for child in blocks]
    assert blocks and all(isinstance(block, tuple(expected)) for block in blocks)  # every block list is covered


def test_strategy_refuses_what_it_cannot_wrap():
    with pytest.raises(TypeError, match="has no `backbone`"):
        block_classes(torch.nn.Linear(2, 2))
    module = DiT(create_backbone("DiT-Nano/2", **TINY))
    module.backbone.block_classes = ()
    with pytest.raises(ValueError, match="declares no block_classes"):
        block_classes(module)
    with pytest.raises(ValueError, match="sets auto_wrap_policy"):
        BackboneFSDPStrategy(auto_wrap_policy={DiTBlock})


def test_precision_plugin_clips_by_norm_through_fsdp():
    strategy = BackboneFSDPStrategy()
    from lightning.pytorch.plugins.precision import FSDPPrecision

    strategy.precision_plugin = FSDPPrecision("bf16-mixed")
    assert isinstance(strategy.precision_plugin, ShardedNormClipping)
    assert strategy.precision_plugin.precision == "bf16-mixed"
    with pytest.raises(RuntimeError, match="before BackboneFSDPStrategy wrapped"):
        strategy.precision_plugin.clip_grad_by_norm(None, 1.0)


def fsdp_config(tmp_path: Path, accelerator: str, state_dict_type: str, steps: int) -> Path:
    """The debug DiT under BackboneFSDPStrategy (activation checkpointing, clipping by norm), checkpoint every step."""
    path, ckpt_dir = config_in(tmp_path)
    config = yaml.safe_load(path.read_text())
    trainer = config["trainer"]
    trainer.update(accelerator=accelerator, devices=1, max_steps=steps, limit_val_batches=0, gradient_clip_val=0.5,
                   precision="bf16-mixed" if accelerator == "gpu" else "32-true")
    trainer["strategy"] = {"class_path": "maskdiff.scale.BackboneFSDPStrategy",
                           "init_args": {"activation_checkpointing": True, "state_dict_type": state_dict_type}}
    trainer["callbacks"] = [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                             "init_args": {"dirpath": str(ckpt_dir), "save_last": True, "every_n_train_steps": 1}}]
    path.write_text(yaml.safe_dump(config))
    return path


def fit_and_consolidate(tmp_path: Path, accelerator: str, capsys) -> None:
    main(["fit", "--config", str(fsdp_config(tmp_path, accelerator, "sharded", steps=3))])
    sharded = tmp_path / "checkpoints" / "last.ckpt"
    assert sharded.is_dir() and any(sharded.glob("*.distcp"))
    main(["convert", "fsdp", str(sharded), str(tmp_path / "plain.ckpt")])
    assert "weights only" in capsys.readouterr().out
    plain = torch.load(tmp_path / "plain.ckpt", weights_only=True)
    assert plain["global_step"] == 3 and "optimizer_states" not in plain
    assert not any("_fsdp_wrapped_module" in key or "_checkpoint_wrapped" in key for key in plain["state_dict"])
    module = load_method(tmp_path / "plain.ckpt")
    assert type(module) is DiT and module.ema_backbone is not None
    trained = {k: v for k, v in plain["state_dict"].items() if k.startswith("backbone.")}
    fresh = DiT(create_backbone("DiT-Nano/2", input_size=8, in_channels=1, num_classes=10, hidden_size=32, num_heads=2, depth=2))
    assert any(not torch.equal(value, fresh.state_dict()[key]) for key, value in trained.items())  # it trained
    images = module.generate(torch.tensor([0, 1]), steps=2, generator=torch.Generator().manual_seed(0))
    assert images.shape == (2, 1, 8, 8) and torch.isfinite(images).all()


@pytest.mark.slow
def test_fsdp_fit_saves_a_sharded_checkpoint_that_converts_for_sampling(tmp_path, digits_cache, capsys):
    fit_and_consolidate(tmp_path, "cpu", capsys)


@pytest.mark.gpu
@GPU
def test_fsdp_fit_saves_a_sharded_checkpoint_that_converts_for_sampling_on_gpu(tmp_path, digits_cache, capsys):
    fit_and_consolidate(tmp_path, "gpu", capsys)


def fit_save_and_resume(tmp_path: Path, accelerator: str, state_dict_type: str) -> None:
    config = fsdp_config(tmp_path, accelerator, state_dict_type, steps=4)
    main(["fit", "--config", str(config), "--trainer.max_steps", "2"])
    saved = tmp_path / "checkpoints" / "last.ckpt"
    assert saved.is_dir() == (state_dict_type == "sharded")
    main(["fit", "--config", str(config), "--ckpt_path", "last"])
    if state_dict_type == "full":
        assert torch.load(saved, weights_only=True)["global_step"] == 4
    else:
        assert torch.load(saved / "meta.pt", weights_only=True)["global_step"] == 4


@pytest.mark.slow
@pytest.mark.parametrize("state_dict_type", ["sharded", "full"])
def test_fsdp_checkpoints_resume(tmp_path, digits_cache, state_dict_type):
    fit_save_and_resume(tmp_path, "cpu", state_dict_type)


@pytest.mark.gpu
@GPU
@pytest.mark.parametrize("state_dict_type", ["sharded", "full"])
def test_fsdp_checkpoints_resume_on_gpu(tmp_path, digits_cache, state_dict_type):
    fit_save_and_resume(tmp_path, "gpu", state_dict_type)


@pytest.mark.slow
def test_two_cpu_ranks_shard_the_ema_like_the_live_weights(tmp_path):
    """FULL_SHARD over 2 gloo ranks: each rank holds half of the backbone, its EMA shard lines up with its live shard
    (decay 0: the consolidated EMA equals the live weights exactly), clipping by norm runs on the shards, and the
    weight-decay groups are those of the unsharded module."""
    script = Path(__file__).with_name("fsdp_two_ranks.py")
    done = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(script.parents[2])})
    assert done.returncode == 0, done.stderr[-3000:]
    total = sum(p.numel() for p in create_backbone("DiT-Nano/2", **TINY, num_classes=10).parameters())
    reports = re.findall(r"rank (\d) step (\d) local (\d+) aligned (True|False)", done.stdout)  # the 2 ranks share stdout
    assert sorted(reports) == [(rank, step, str(total // 2), "True") for rank in "01" for step in "123"]
    unsharded = DiT(create_backbone("DiT-Nano/2", **TINY, num_classes=10), ema_decay=0.0).configure_optimizers()
    groups = str([len(group["params"]) for group in unsharded.param_groups])
    assert done.stdout.count(f"weight decay groups {groups}") == 2  # decided before FSDP flattened the parameters
    state_dict = consolidate_sharded_checkpoint(tmp_path / "sharded")["state_dict"]
    live = {key[len("backbone."):]: value for key, value in state_dict.items() if key.startswith("backbone.")}
    assert live and all(torch.equal(state_dict[f"ema_backbone.{key}"], value) for key, value in live.items())
