import csv

import pytest
import torch

from maskdiff.backbones import create_backbone
from maskdiff.methods.checkpoints import load_method
from maskdiff.tools.main import main
from maskdiff.corruption import TokenMasking
from maskdiff.methods import MAE
from maskdiff.objectives import MaskedReconstruction
from tests.helpers import CONFIGS, config_in, single_thread

MAE_DIGITS = CONFIGS / "mae" / "mae_digits.yaml"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def short_run(tmp_path_factory, digits_cache):
    """60 steps of configs/mae/mae_digits.yaml, logging every 5 steps: ``(checkpoint dir, logged train losses)``."""
    tmp_path = tmp_path_factory.mktemp("mae_digits")
    path, ckpt_dir = config_in(tmp_path, MAE_DIGITS)
    with single_thread():
        main(["fit", "--config", str(path), "--trainer.max_steps", "60", "--trainer.log_every_n_steps", "5"])
    rows = list(csv.DictReader(next((tmp_path / "logs").rglob("metrics.csv")).open()))
    return ckpt_dir, [float(row["train/loss"]) for row in rows if row.get("train/loss")]


def nano_method(**kwargs) -> MAE:
    return MAE(backbone=create_backbone("mae_nano"), **kwargs)


def test_fast_dev_run_through_the_cli(tmp_path, digits_cache):
    path, _ = config_in(tmp_path, MAE_DIGITS)
    main(["fit", "--config", str(path), "--trainer.fast_dev_run", "2"])


def test_defaults_follow_the_paper():
    method = nano_method()
    assert isinstance(method.corruption, TokenMasking) and method.corruption.mask_ratio == 0.75
    assert isinstance(method.objective, MaskedReconstruction)
    assert (method.objective.norm_pix, method.objective.region) == (False, "masked")
    assert method.sampler is None and method.ema_backbone is None
    optimizer = method.configure_optimizers()
    assert isinstance(optimizer, torch.optim.AdamW)
    decay, no_decay = optimizer.param_groups
    assert decay["betas"] == (0.9, 0.95) and decay["lr"] == 1.5e-4 and decay["weight_decay"] == 0.05
    assert no_decay["weight_decay"] == 0.0
    no_decay_ids = {id(p) for p in no_decay["params"]}
    # as the official add_weight_decay: only 1-D tensors skip weight decay; the 3-D cls and mask tokens decay
    assert id(method.backbone.cls_token) not in no_decay_ids and id(method.backbone.mask_token) not in no_decay_ids
    assert all(p.ndim <= 1 for p in no_decay["params"])
    assert id(method.backbone.patch_embed.weight) not in no_decay_ids
    with pytest.raises(ValueError, match="MAE cannot generate: objective MaskedReconstruction declares no parameterization"):
        method.generate(num=2)


def test_loss_counts_hidden_patches_only():
    method = nano_method()
    images = torch.rand(4, 1, 8, 8) * 2 - 1
    (view,) = method.corruption(method.to_tokens(images), method.patchifier.grid)
    with torch.no_grad():
        prediction = method.backbone(view.tokens, view.model_t, None, view.masking)
    hidden = view.masking.mask.unsqueeze(-1)
    loss = method.objective(prediction, view).loss

    assert view.masking.mask.sum(1).eq(12).all()  # 16 tokens, 4 visible
    expected = ((prediction - view.clean) ** 2).mean(-1)[view.masking.mask].mean()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(method.objective(prediction + 5.0 * ~hidden, view).loss, loss)
    assert method.objective(prediction + 5.0 * hidden, view).loss > loss + 1


def test_short_run_loss_falls(short_run):
    _, losses = short_run
    assert len(losses) == 12
    assert sum(losses[-2:]) / 2 < 0.8 * sum(losses[:2]) / 2, losses


def test_load_method_rebuilds_mae(short_run):
    ckpt_dir, _ = short_run
    last = ckpt_dir / "last.ckpt"
    method = load_method(last)
    assert type(method) is MAE
    assert method.backbone.hidden_size == 128 and method.backbone.patchifier.num_tokens == 16
    assert isinstance(method.corruption, TokenMasking) and method.ema_backbone is None
    saved = torch.load(last, weights_only=True)["state_dict"]
    assert set(saved) == set(method.state_dict())
    for key, value in method.state_dict().items():
        torch.testing.assert_close(value, saved[key])


@pytest.mark.parametrize("norm_pix", [False, True])
def test_reconstruct_keeps_visible_patches(norm_pix):
    method = nano_method(objective=MaskedReconstruction(norm_pix=norm_pix))
    method.train()
    images = torch.rand(3, 1, 8, 8) * 2 - 1

    reconstruction, mask = method.reconstruct(images, 0.75, generator=torch.Generator().manual_seed(0))
    _, same_mask = method.reconstruct(images, 0.75, generator=torch.Generator().manual_seed(0))

    assert reconstruction.shape == images.shape and mask.shape == (3, 16) and mask.dtype == torch.bool
    assert torch.equal(mask, same_mask) and mask.sum(1).eq(12).all()
    original, rebuilt = method.patchifier.patchify(images), method.patchifier.patchify(reconstruction)
    assert torch.equal(rebuilt[~mask], original[~mask])
    assert not torch.allclose(rebuilt[mask], original[mask])
    assert method.backbone.training  # the caller's mode is restored


@pytest.mark.slow
def test_mae_digits_two_process_ddp_with_online_probe(tmp_path, digits_cache):
    """The MAE digits config (with its online linear probe) trains under 2-process DDP on the CPU."""
    import os
    import subprocess
    import sys

    from tests.helpers import CONFIGS, ROOT, config_in

    config, ckpt_dir = config_in(tmp_path, CONFIGS / "mae" / "mae_digits.yaml")
    command = [sys.executable, "-m", "maskdiff.tools.main", "fit", "--config", str(config), "--trainer.devices", "2",
               "--trainer.strategy", "ddp", "--trainer.max_steps", "4", "--trainer.limit_val_batches", "2",
               "--trainer.val_check_interval", "4", "--trainer.check_val_every_n_epoch", "null"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    checkpoint = torch.load(ckpt_dir / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 4
    assert any("OnlineLinearProbe" in key for key in checkpoint["callbacks"])
