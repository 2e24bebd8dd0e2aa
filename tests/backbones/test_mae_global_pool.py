"""MAE's average-pool feature is the official ``models_vit`` ``global_pool`` path: ``fc_norm(x[:, 1:].mean(1))`` of the
block outputs before the final ``norm``; checked against that computation written out here on official weights."""

import logging

import torch
import torch.nn.functional as F

from maskdiff.backbones import create_backbone
from maskdiff.backbones.features import FeatureSpec
from maskdiff.convert.mae import mae_from_official
from maskdiff.evaluation.features import extract_features
from maskdiff.methods import FineTune
from maskdiff.tools.main import main
from tests.convert.test_mae_convert import official_block, random_official_state_dict, save_official

SMALL = {"input_size": 12, "patch_size": 3, "in_channels": 3, "hidden_size": 48, "depth": 2, "num_heads": 4,
         "decoder_hidden_size": 32, "decoder_depth": 2, "decoder_num_heads": 2}


def official_forward_features(sd: dict, imgs: torch.Tensor, global_pool: bool, num_heads: int = 4) -> torch.Tensor:
    """facebookresearch/mae ``models_vit.VisionTransformer.forward_features`` (no masking)."""
    x = F.conv2d(imgs, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=SMALL["patch_size"])
    x = torch.cat([sd["cls_token"].expand(imgs.shape[0], -1, -1), x.flatten(2).transpose(1, 2)], dim=1) + sd["pos_embed"]
    depth = sum(key.endswith(".norm1.weight") and key.startswith("blocks.") for key in sd)
    for i in range(depth):
        x = official_block(sd, f"blocks.{i}", x, num_heads)
    if global_pool:
        return F.layer_norm(x[:, 1:, :].mean(dim=1), x.shape[-1:], sd["fc_norm.weight"], sd["fc_norm.bias"], eps=1e-6)
    return F.layer_norm(x, x.shape[-1:], sd["norm.weight"], sd["norm.bias"], eps=1e-6)[:, 0]


def global_pool_probe_state_dict() -> dict[str, torch.Tensor]:
    """A ``main_linprobe.py --global_pool`` checkpoint: models_vit with ``fc_norm`` (random here), no final ``norm``,
    the BatchNorm + linear probe head."""
    sd = random_official_state_dict(**SMALL, decoder=False, seed=3)
    generator = torch.Generator().manual_seed(4)
    width = SMALL["hidden_size"]
    sd.pop("norm.weight"), sd.pop("norm.bias")
    sd |= {"fc_norm.weight": 1 + 0.3 * torch.randn(width, generator=generator),
           "fc_norm.bias": 0.3 * torch.randn(width, generator=generator),
           "head.0.running_mean": torch.zeros(width), "head.0.running_var": torch.ones(width),
           "head.0.num_batches_tracked": torch.tensor(0), "head.1.weight": torch.randn(10, width), "head.1.bias": torch.zeros(10)}
    return sd


def test_mean_feature_of_a_converted_global_pool_checkpoint_is_the_official_one(caplog):
    sd = global_pool_probe_state_dict()
    with caplog.at_level(logging.WARNING, logger="maskdiff.convert"):
        imported = mae_from_official({"model": sd}, num_heads=4, decoder_num_heads=2)
    assert imported.config["fc_norm"] is True
    assert "classifier head dropped (head.0.num_batches_tracked" in caplog.text and "without a final norm" in caplog.text
    torch.testing.assert_close(imported.model.fc_norm.weight, sd["fc_norm.weight"])

    imgs = torch.randn(4, 3, 12, 12, generator=torch.Generator().manual_seed(5))
    ours = extract_features(imported.model, imgs, FeatureSpec(pooling="mean"))
    official = official_forward_features(sd, imgs, global_pool=True)
    error = (ours - official).abs().max().item()
    print(f"\nMAE global_pool feature vs the official computation: max abs difference {error:.2e}")
    assert error <= 1e-5


def test_mean_feature_of_a_pretraining_is_the_fresh_fc_norm_over_pre_norm_tokens():
    sd = random_official_state_dict(**SMALL, decoder=False, seed=6)
    model = mae_from_official({"model": sd}, num_heads=4, decoder_num_heads=2).model
    assert "fc_norm" not in model.state_dict() and not model.fc_norm.elementwise_affine
    imgs = torch.randn(4, 3, 12, 12, generator=torch.Generator().manual_seed(7))
    fresh = {"fc_norm.weight": torch.ones(48), "fc_norm.bias": torch.zeros(48)}  # main_linprobe's new fc_norm
    official = official_forward_features(sd | fresh, imgs, global_pool=True)
    ours = extract_features(model, imgs, FeatureSpec(pooling="mean"))
    assert (ours - official).abs().max().item() <= 1e-5
    before = model.forward_features(model.patchifier.patchify(imgs))[:, 1:].mean(1)  # the mean of post-norm tokens
    assert (before - official).abs().max().item() > 0.1
    cls = extract_features(model, imgs, FeatureSpec(pooling="cls"))  # cls stays the token after the final norm
    assert (cls - official_forward_features(sd, imgs, global_pool=False)).abs().max().item() <= 1e-5
    depth = extract_features(model, imgs, FeatureSpec(pooling="mean", depth=2))  # an explicit depth: the plain mean
    torch.testing.assert_close(depth, model.forward_features(model.patchifier.patchify(imgs), depth=2)[:, 1:].mean(1))


def test_fine_tune_starts_its_fc_norm_from_the_checkpoints(tmp_path):
    sd = global_pool_probe_state_dict()
    main(["convert", "mae", str(save_official(tmp_path, sd)), str(tmp_path / "probe.ckpt"), "--num_heads", "4",
          "--decoder_num_heads", "2", "--fold_imagenet_normalization", "false"])
    finetune = FineTune(ckpt=str(tmp_path / "probe.ckpt"), num_classes=10)
    finetune.configure_model()
    torch.testing.assert_close(finetune.fc_norm.weight, sd["fc_norm.weight"])
    torch.testing.assert_close(finetune.fc_norm.bias, sd["fc_norm.bias"])
    assert create_backbone("mae_nano").fc_norm.weight is None
