"""UMD's backbone: the official initialisers, big_vision's weight-decay mask and the decoder's final LayerNorm."""

import math

import pytest
import torch
import yaml

from maskdiff.backbones import DiT, UMD
from maskdiff.methods import UMD as UMDMethod
from tests.helpers import CONFIGS

pytestmark = pytest.mark.usefixtures("one_thread")

WIDTH = 64
SMALL = dict(input_size=16, patch_size=4, in_channels=3, hidden_size=WIDTH, depth=1, num_heads=4, decoder_depth=1)


def umd(**overrides) -> UMD:
    torch.manual_seed(0)
    return UMD(**{**SMALL, **overrides})


def assert_lecun_normal(weight: torch.Tensor) -> None:
    """flax's default kernel init: std 1/√fan_in, a normal truncated at ±2 of its 1/√fan_in/0.8796 scale."""
    std = 1 / math.sqrt(weight.shape[1])
    assert weight.std().item() == pytest.approx(std, rel=0.08)
    assert weight.abs().max().item() <= 2 * std / 0.87962566103423978 + 1e-6


def assert_xavier_uniform(weight: torch.Tensor, fan_in: int, fan_out: int) -> None:
    bound = math.sqrt(6 / (fan_in + fan_out))
    assert weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.08)
    assert weight.abs().max().item() <= bound


def test_initialisers_are_the_official_ones():
    model = umd(num_classes=100)
    assert_lecun_normal(model.x_embedder.weight)
    for layer in model.trunks():
        assert_lecun_normal(layer.weight)
    for block in (*model.blocks, *model.decoder_blocks):
        for kernel in (*block.attn.qkv.weight.chunk(3), block.attn.proj.weight):  # each D x D, as flax's DenseGeneral
            assert_xavier_uniform(kernel, WIDTH, WIDTH)
        assert_xavier_uniform(block.mlp.fc1.weight, WIDTH, 4 * WIDTH)
        assert 0 < block.mlp.fc1.bias.abs().max() < 1e-5 and 0 < block.mlp.fc2.bias.abs().max() < 1e-5
        assert not block.attn.qkv.bias.any() and not block.adaLN_modulation[-1].weight.any()
    assert model.pos_embed.std().item() == pytest.approx(1 / math.sqrt(16), rel=0.1)
    assert model.y_embedder.embedding_table.weight.std().item() == pytest.approx(1 / math.sqrt(WIDTH), rel=0.08)
    assert model.head.linear.weight.std().item() == pytest.approx(0.02, rel=0.1) and not model.head.linear.bias.any()
    assert not model.registers.any() and not model.head.adaLN_modulation[-1].weight.any()
    assert umd(num_classes=100, label_embedding_std=0.02).y_embedder.embedding_table.weight.std().item() == pytest.approx(0.02, rel=0.08)


def test_weight_decay_mask_is_big_vision_no_decay_list():
    module = UMDMethod(backbone=umd(num_classes=10, final_norm_affine=True), ema_decay=None)
    decayed = module.weight_decayed()
    undecayed = {name for name, param in module.backbone.named_parameters() if not decayed[id(param)]}
    biases = {name for name, _ in module.backbone.named_parameters() if name.endswith("bias")}
    assert undecayed == {"registers", "mask_token"} | biases  # cls, image_mask_embedding and biases
    named = dict(module.backbone.named_parameters())
    for name in ("blocks.0.norm1.weight", "norm.weight", "head.norm.weight", "pos_embed", "y_embedder.embedding_table.weight"):
        assert decayed[id(named[name])], name
    dit = DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=1, num_heads=2, num_classes=2)
    assert not dit.decays("x_embedder.bias", dit.x_embedder.bias) and dit.decays("x_embedder.weight", dit.x_embedder.weight)


def test_final_norm_affine_adds_the_official_scale_and_bias_and_defaults_to_the_old_layout():
    old, official = umd(), umd(final_norm_affine=True)
    assert "head.norm.weight" not in old.state_dict() and set(official.state_dict()) - set(old.state_dict()) == {
        "head.norm.weight", "head.norm.bias"}
    official.load_state_dict({**old.state_dict(), "head.norm.weight": torch.ones(WIDTH), "head.norm.bias": torch.zeros(WIDTH)})
    tokens, t = torch.randn(2, 16, 48), torch.tensor([0.0, 500.0])
    with torch.no_grad():
        torch.nn.init.normal_(old.head.adaLN_modulation[-1].weight)
        official.head.adaLN_modulation[-1].weight.copy_(old.head.adaLN_modulation[-1].weight)
        torch.testing.assert_close(official.eval()(tokens, t), old.eval()(tokens, t))  # scale 1, bias 0: the old function
        official.head.norm.bias.fill_(0.5)
        assert not torch.allclose(official(tokens, t), old(tokens, t))
    assert umd(adaln=False).head.norm.elementwise_affine


@pytest.mark.parametrize("config", ["umd_b4_imagenet64.yaml", "umd_l2_imagenet256_latent.yaml", "umd_finetune_b4_imagenet64.yaml"])
def test_imagenet_configs_build_the_official_architecture(config):
    backbone = yaml.safe_load((CONFIGS / "umd" / config).read_text())["model"]["init_args"]["backbone"]["init_args"]
    assert backbone["adaln"] is True and backbone["final_norm_affine"] is True and backbone["label_embedding_std"] is None
