import pytest
import torch
from timm.layers import DropPath

from maskdiff.backbones import create_backbone
from maskdiff.backbones.mae import MAE_SIZES
from maskdiff.methods.checkpoints import write_method_checkpoint
from maskdiff.tools.lightning_cli import MaskDiffCLI
from maskdiff.tools.main import main
from maskdiff.methods import MAE
from maskdiff.methods.finetune import FineTune
from tests.helpers import CONFIGS, config_in

FINETUNE_DIGITS = CONFIGS / "finetune_digits.yaml"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def mae_ckpt(tmp_path_factory):
    """An untrained nano MAE (8x8, 2 blocks, cls token) written as a maskdiff checkpoint."""
    method = MAE(backbone=create_backbone("mae_nano"))
    backbone = {"class_path": "maskdiff.backbones.MAE", "init_args": MAE_SIZES["mae_nano"]}
    return write_method_checkpoint(tmp_path_factory.mktemp("mae") / "mae.ckpt", "maskdiff.methods.MAE",
                                   {"backbone": backbone}, method.state_dict())


def test_fast_dev_run_of_the_digits_config(dit_ckpt, tmp_path):
    config, _ = config_in(tmp_path, FINETUNE_DIGITS)
    cli = MaskDiffCLI(args=[
        "fit", "--config", str(config), "--model.init_args.ckpt", str(dit_ckpt), "--data.init_args.image_size", "8",
        "--trainer.fast_dev_run", "2", "--trainer.logger", "false",
    ])
    metrics = cli.trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss"])
    assert 0.0 <= float(metrics["val/top1"]) <= float(metrics["val/top5"]) <= 1.0
    model = cli.model
    assert model.spec.timestep == 0 and model.spec.pooling == "mean"
    assert not any(p.requires_grad for p in model.backbone.final_layer.parameters())  # unused by the features


def test_layer_decay_groups_have_the_expected_lr_scales(dit_ckpt):
    model = FineTune(str(dit_ckpt), num_classes=10, timestep=0, layer_decay=0.5,
                     optimizer=lambda params: torch.optim.AdamW(params, lr=1e-3, weight_decay=0.05))
    model.configure_model()
    optimizer = model.configure_optimizers()
    lr_of = {id(p): (group["lr"], group["weight_decay"]) for group in optimizer.param_groups for p in group["params"]}
    params = dict(model.named_parameters())
    depth = model.backbone.num_blocks
    expected = {"backbone.x_embedder.weight": 0.5 ** (depth + 1), "backbone.t_embedder.mlp.0.weight": 0.5 ** (depth + 1),
                "backbone.y_embedder.embedding_table.weight": 0.5 ** (depth + 1), "head.weight": 1.0, "fc_norm.weight": 1.0,
                **{f"backbone.blocks.{i}.attn.qkv.weight": 0.5 ** (depth - i) for i in range(depth)}}
    for name, scale in expected.items():
        assert lr_of[id(params[name])][0] == pytest.approx(1e-3 * scale), name
    assert lr_of[id(params["backbone.blocks.0.attn.qkv.weight"])][1] == 0.05
    assert lr_of[id(params["backbone.blocks.0.attn.qkv.bias"])][1] == 0.0
    assert id(params["backbone.final_layer.linear.weight"]) not in lr_of


def test_mae_backbone_cls_pooling_and_drop_path(mae_ckpt):
    model = FineTune(str(mae_ckpt), num_classes=10, pooling="cls", drop_path_rate=0.2)
    model.configure_model()
    blocks = model.backbone.blocks
    assert isinstance(blocks[-1].drop_path1, DropPath) and blocks[-1].drop_path1.drop_prob == pytest.approx(0.2)
    assert not isinstance(blocks[0].drop_path1, DropPath)
    assert not any(p.requires_grad for p in model.backbone.decoder_blocks.parameters())
    assert model.backbone.norm.weight.requires_grad  # cls pooling reads the final norm
    assert model(torch.rand(4, 1, 8, 8) * 2 - 1).shape == (4, 10)

    mean = FineTune(str(mae_ckpt), num_classes=10, pooling="mean")
    mean.configure_model()
    assert not mean.backbone.norm.weight.requires_grad  # global pool: fc_norm replaces the final norm, as in MAE
    with pytest.raises(ValueError, match="timestep 0 was given, but MAE is not conditioned on timesteps"):
        FineTune(str(mae_ckpt), num_classes=10, timestep=0).configure_model()


def test_bad_settings_are_named(dit_ckpt, tmp_path):
    with pytest.raises(ValueError, match="drop_path_rate 0.1 needs encoder blocks with drop paths .* DiTBlock"):
        FineTune(str(dit_ckpt), num_classes=10, timestep=0, drop_path_rate=0.1).configure_model()
    with pytest.raises(ValueError, match="pooling 'cls' needs a cls/prefix token"):
        FineTune(str(dit_ckpt), num_classes=10, pooling="cls").configure_model()
    with pytest.raises(ValueError, match="layer_decay 0 is outside"):
        FineTune(str(dit_ckpt), layer_decay=0)
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        FineTune(str(tmp_path / "missing.ckpt"), num_classes=10).configure_model()
    with pytest.raises(ValueError, match="data image_size 16 .* expects input_size 8"):
        main(["fit", "--config", str(config_in(tmp_path, FINETUNE_DIGITS)[0]), "--model.init_args.ckpt", str(dit_ckpt),
              "--trainer.fast_dev_run", "1", "--trainer.logger", "false"])


def test_compiled_finetune_trains_with_the_same_keys(dit_ckpt, tmp_path):
    config, _ = config_in(tmp_path, FINETUNE_DIGITS)
    cli = MaskDiffCLI(args=[
        "fit", "--config", str(config), "--model.init_args.ckpt", str(dit_ckpt), "--data.init_args.image_size", "8",
        "--model.init_args.compile_backbone", "true", "--model.init_args.compile_kwargs", "{backend: eager}",
        "--trainer.fast_dev_run", "2", "--trainer.logger", "false",
    ])
    model = cli.model
    assert "forward_features" in vars(model.backbone)  # the features the head reads go through torch.compile
    assert not any("_orig_mod" in key for key in model.state_dict())
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])
