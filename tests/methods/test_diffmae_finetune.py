"""A DiffMAE image encoder fine-tuned and probed (offline) exactly like an MAE encoder."""

import json

import pytest
import torch
from timm.layers import DropPath

from maskdiff.backbones import DiffMAE as DiffMAEBackbone
from maskdiff.methods.checkpoints import write_method_checkpoint
from maskdiff.tools.lightning_cli import MaskDiffCLI
from maskdiff.tools.main import main
from maskdiff.methods import DiffMAE
from maskdiff.methods.finetune import FineTune
from tests.helpers import CONFIGS, config_in

NANO = {"input_size": 8, "patch_size": 2, "in_channels": 1, "hidden_size": 32, "depth": 2, "num_heads": 2,
        "decoder_hidden_size": 32, "decoder_depth": 2, "decoder_num_heads": 2}
FINETUNE_DIGITS = CONFIGS / "diffmae" / "finetune_digits.yaml"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def diffmae_ckpt(tmp_path_factory):
    """An untrained nano DiffMAE (8x8 digits, patch 2, cls token) written as a maskdiff checkpoint."""
    torch.manual_seed(0)
    method = DiffMAE(backbone=DiffMAEBackbone(**NANO))
    backbone = {"class_path": "maskdiff.backbones.DiffMAE", "init_args": NANO}
    return write_method_checkpoint(tmp_path_factory.mktemp("diffmae") / "diffmae.ckpt", "maskdiff.methods.DiffMAE",
                                   {"backbone": backbone}, method.state_dict())


def test_encoder_weights_are_loaded_exactly_and_the_decoder_is_frozen(diffmae_ckpt):
    saved = torch.load(diffmae_ckpt, weights_only=True)["state_dict"]
    model = FineTune(str(diffmae_ckpt), num_classes=10, weights="raw", drop_path_rate=0.1, layer_decay=0.75)
    model.configure_model()
    for key, value in model.backbone.state_dict().items():
        assert torch.equal(value, saved[f"backbone.{key}"]), key
    blocks = model.backbone.blocks
    assert isinstance(blocks[-1].drop_path1, DropPath) and blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)
    assert model.spec.timestep is None and model.spec.pooling == "mean"
    optimizer = model.configure_optimizers()
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    params = dict(model.named_parameters())
    assert id(params["backbone.blocks.0.attn.qkv.weight"]) in optimized
    assert not any(id(p) in optimized for name, p in params.items()
                   if name.startswith(("backbone.decoder_blocks", "backbone.noisy_embed", "backbone.t_embedder")))
    decay = {id(p): group.get("weight_decay", 0.05) for group in optimizer.param_groups for p in group["params"]}
    assert decay[id(params["backbone.cls_token"])] == 0.0  # as MAE's fine-tune: no decay on the cls token
    assert decay[id(params["backbone.blocks.0.attn.qkv.weight"])] == 0.05


def test_fast_dev_run_of_the_diffmae_digits_config(diffmae_ckpt, tmp_path, digits_cache):
    config, _ = config_in(tmp_path, FINETUNE_DIGITS)
    cli = MaskDiffCLI(args=[
        "fit", "--config", str(config), "--model.init_args.ckpt", str(diffmae_ckpt), "--data.init_args.image_size", "8",
        "--trainer.fast_dev_run", "2", "--trainer.logger", "false",
    ])
    metrics = cli.trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss"])
    assert 0.0 <= float(metrics["val/top1"]) <= float(metrics["val/top5"]) <= 1.0
    assert not cli.model.is_video


def test_offline_probe_of_a_diffmae_checkpoint(diffmae_ckpt, tmp_path, digits_cache):
    out = tmp_path / "probe.json"
    main(["probe", "--ckpt", str(diffmae_ckpt), "--data.class_path", "maskdiff.data.DigitsDataModule",
          "--data.init_args.image_size", "8", "--out", str(out), "--cache_dir", str(tmp_path / "cache"),
          "--batch_size", "256", "--epochs", "4", "--warmup_epochs", "1", "--optimizer", "sgd"])
    result = json.loads(out.read_text())
    assert result["pooling"] == "cls" and result["timestep"] is None and result["feature_dim"] == NANO["hidden_size"]
    assert (result["num_train"], result["num_val"]) == (1497, 300)
    assert 0.1 < result["top1"] <= result["top5"] <= 1.0  # even random ViT features beat chance on the digits
