import os
import subprocess
import sys

import pytest
import torch
import yaml
from timm.optim import Adan

from maskdiff.backbones import MDTv2 as MDTv2Backbone
from maskdiff.methods.checkpoints import load_method
from maskdiff.tools.main import main
from maskdiff.corruption import MaskedNoise
from maskdiff.methods import MDT
from maskdiff.objectives import DiffusionLoss
from maskdiff.samplers import DDIMSampler
from tests.helpers import CONFIGS, FAST_GRID, ROOT, config_in

MDT_DIGITS = CONFIGS / "mdt" / "mdt_digits.yaml"


def small_method(**corruption):
    torch.manual_seed(0)
    backbone = MDTv2Backbone(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=4, num_heads=2,
                             decode_layer=2, num_classes=10)
    for p in backbone.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return MDT(backbone=backbone, corruption=MaskedNoise(**corruption), ema_decay=None, clip_x0=1.0)


def test_two_pass_loss_is_the_sum_of_the_single_pass_losses():
    method = small_method(mask_ratio=0.3, max_mask_ratio=0.5)
    images, labels = torch.rand(4, 1, 8, 8) * 2 - 1, torch.tensor([0, 1, 2, 3])
    method.backbone.y_embedder.dropout_prob = 0.0
    torch.manual_seed(7)
    total = method.step_loss(images, labels)
    torch.manual_seed(7)
    views = method.corruption(method.to_tokens(images), method.patchifier.grid)
    losses = [method.objective(method.backbone(v.tokens, v.model_t, labels, v.masking), v).loss for v in views]
    torch.testing.assert_close(total.loss, losses[0] + losses[1])
    assert set(total.parts) >= {"full/mse", "full/vlb", "masked/mse", "masked/loss"}


def test_sampling_does_not_depend_on_the_mask_settings():
    generated = []
    for ratio in (0.1, 0.6):
        method = small_method(mask_ratio=ratio).eval()
        generated.append(method.generate(torch.tensor([1, 2]), sampler=DDIMSampler(5),
                                         generator=torch.Generator().manual_seed(0)))
    torch.testing.assert_close(generated[0], generated[1])


def test_default_guidance_is_power_cosine():
    method = small_method()
    assert method.guidance.schedule == "power_cosine" and method.guidance.scale == 3.8 and method.guidance.power == 4.0
    assert method.guidance.channels == 3  # the official forward_with_cfg guides 3 of 4 latent channels
    assert isinstance(method.objective, DiffusionLoss) and method.objective.region == "all"


def test_mdt_digits_fit_load_and_sample(tmp_path, digits_cache, capsys):
    config, ckpt_dir = config_in(tmp_path, MDT_DIGITS, grid=FAST_GRID)
    main(["fit", "--config", str(config), "--trainer.max_steps", "3", "--trainer.limit_val_batches", "1"])
    module = load_method(ckpt_dir / "last.ckpt")
    assert type(module) is MDT and isinstance(module.corruption, MaskedNoise)
    main(["sample", "--ckpt", str(ckpt_dir / "last.ckpt"), "--out", str(tmp_path / "grid.png"), "--sampler", "ddim",
          "--steps", "4", "--per_class", "1"])
    assert "cfg 2.0 (constant)" in capsys.readouterr().out
    assert (tmp_path / "grid.png").stat().st_size > 0


@pytest.mark.slow
def test_two_process_ddp_without_unused_parameter_search(tmp_path, digits_cache):
    """Both passes run in one step, so the side-interpolater always gets gradients: plain DDP works."""
    config, ckpt_dir = config_in(tmp_path, MDT_DIGITS, grid=FAST_GRID)
    command = [sys.executable, "-m", "maskdiff.tools.main", "fit", "--config", str(config), "--trainer.devices", "2",
               "--trainer.strategy", "ddp", "--trainer.max_steps", "4", "--trainer.limit_val_batches", "1"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert torch.load(ckpt_dir / "last.ckpt", weights_only=True)["global_step"] == 4


@pytest.mark.slow
def test_compare_dit_mdt_example(tmp_path, digits_cache):
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "compare_dit_mdt.py"), "--steps", "4", "--eval_every", "2",
         "--per_class", "2", "--out", str(tmp_path / "out")],
        cwd=tmp_path, capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    import json

    report = json.loads((tmp_path / "out" / "comparison.json").read_text())
    assert [run["name"] for run in report["runs"]] == ["DiT", "MDT"]
    for run in report["runs"]:
        assert [row["step"] for row in run["history"]] == [2, 4]
        assert all(0.0 <= row["class_consistency"] <= 1.0 and row["digits_fd"] > 0 for row in run["history"])
    assert "| 4 |" in (tmp_path / "out" / "comparison.md").read_text()


def test_mdtv2_configs_clip_the_global_gradient_norm_as_the_official_adan():
    """The official trainer passes max_grad_norm=1 to Adan, which scales every gradient by min(1, 1 / (‖g‖ + eps))
    over all parameters before its update; the configs clip by global norm 1 before timm's Adan: the same step."""
    for name in ("mdtv2_s2_imagenet256.yaml", "mdtv2_xl2_imagenet256.yaml"):
        trainer = yaml.safe_load((CONFIGS / "mdt" / name).read_text())["trainer"]
        assert (trainer["gradient_clip_val"], trainer["gradient_clip_algorithm"]) == (1.0, "norm"), name
    torch.manual_seed(0)
    start = [torch.randn(8, 4), torch.randn(4)]
    grads = [torch.randn(8, 4) * 3, torch.randn(4) * 3]
    official = [p.clone().requires_grad_() for p in start]
    norm = torch.sqrt(sum((g**2).sum() for g in grads))
    scale = torch.clamp(1.0 / (norm + 1e-8), max=1.0)
    for param, grad in zip(official, grads):
        param.grad = grad * scale
    ours = [p.clone().requires_grad_() for p in start]
    for param, grad in zip(ours, grads):
        param.grad = grad.clone()
    torch.nn.utils.clip_grad_norm_(ours, 1.0)
    for params in (official, ours):
        Adan(params, lr=3e-4, weight_decay=0.0).step()
    assert norm > 1.0
    for a, b in zip(official, ours):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
