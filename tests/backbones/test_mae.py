import pytest
import timm
import torch
from timm.models.vision_transformer import Block

from maskdiff.backbones import MAE, create_backbone, list_backbones
from maskdiff.corruption import random_masking
from maskdiff.corruption.masking import masking_from_noise


pytestmark = pytest.mark.usefixtures("one_thread")


def official_param_count(d, depth, d_dec, depth_dec, p, c=3, tokens=196):
    """Parameter count of models_mae.MaskedAutoencoderViT (frozen pos embeds included), from its module list."""
    def block(w):  # 2 LayerNorms, qkv, proj, fc1 (4w), fc2
        return 12 * w * w + 13 * w

    values = p * p * c
    encoder = (values * d + d) + d + (tokens + 1) * d + depth * block(d) + 2 * d
    decoder = (d * d_dec + d_dec) + d_dec + (tokens + 1) * d_dec + depth_dec * block(d_dec) + 2 * d_dec + (d_dec * values + values)
    return encoder + decoder


def total_count(model: MAE) -> int:
    return sum(p.numel() for p in model.parameters()) + model.pos_embed.numel() + model.decoder_pos_embed.numel()


@pytest.mark.parametrize(
    "name,timm_name,width,depth,patch",
    [("mae_vit_base_patch16", "vit_base_patch16_224", 768, 12, 16),
     ("mae_vit_large_patch16", "vit_large_patch16_224", 1024, 24, 16),
     ("mae_vit_huge_patch14", "vit_huge_patch14_224", 1280, 32, 14)],
)
def test_registry_sizes_match_official_parameter_counts(name, timm_name, width, depth, patch):
    with torch.device("meta"):
        model = create_backbone(name)
        vit = timm.create_model(timm_name, num_classes=0)
    assert total_count(model) == official_param_count(width, depth, 512, 8, patch, tokens=(224 // patch) ** 2)
    encoder = sum(p.numel() for n, p in model.named_parameters() if not n.startswith(("decoder_", "mask_token")))
    assert encoder + model.pos_embed.numel() == sum(p.numel() for p in vit.parameters())  # the ViT encoder of the paper
    if name == "mae_vit_base_patch16":
        assert total_count(model) == 111_907_840


def test_registry_lists_sizes():
    assert {"mae_vit_base_patch16", "mae_vit_large_patch16", "mae_vit_huge_patch14", "mae_vit_tiny_patch4", "mae_nano"} <= set(
        list_backbones("mae_")
    )


def test_shapes_and_contract_attributes():
    model = create_backbone("mae_nano", in_channels=3)  # 8x8 input, patch 2: 16 tokens of 12 values
    tokens = torch.randn(3, 16, 12)
    assert model(tokens).shape == (3, 16, 12)
    assert model(tokens, masking=random_masking(3, 16, 0.75)).shape == (3, 16, 12)
    assert (model.num_prefix_tokens, model.num_classes, model.output_parts, model.num_blocks) == (1, 0, 1, 2)
    assert model.block_classes == (Block,)
    norms = [model.norm, model.decoder_norm, model.blocks[0].norm1, model.decoder_blocks[0].norm2]
    assert all(norm.eps == 1e-6 for norm in norms) and model.blocks[0].attn.qkv.bias is not None
    assert model.no_weight_decay() == set()
    assert not {"pos_embed", "decoder_pos_embed"} & set(model.state_dict())
    assert torch.equal(model.pos_embed[0, 0], torch.zeros(32)) and torch.equal(model.decoder_pos_embed[0, 0], torch.zeros(16))
    with pytest.raises(ValueError, match="timesteps"):
        model(tokens, torch.zeros(3))


@pytest.mark.parametrize("ratio", [0.0, 0.5, 0.75, 0.9])
def test_forward_features_keeps_cls_and_visible_tokens(ratio):
    model = create_backbone("mae_nano", input_size=16)  # 64 tokens
    tokens = torch.randn(2, 64, 4)
    assert model.forward_features(tokens).shape == (2, 1 + 64, 32)
    masking = random_masking(2, 64, ratio)
    assert model.forward_features(tokens, masking=masking).shape == (2, 1 + int(64 * (1 - ratio)), 32)


def test_forward_features_sees_only_visible_tokens():
    model = create_backbone("mae_nano").eval()
    tokens = torch.randn(2, 16, 4)
    masking = random_masking(2, 16, 0.75)
    zeroed = tokens.masked_fill(masking.mask.unsqueeze(-1), 0.0)
    torch.testing.assert_close(model.forward_features(zeroed, masking=masking), model.forward_features(tokens, masking=masking))
    torch.testing.assert_close(model(zeroed, masking=masking), model(tokens, masking=masking))


def test_depth_stops_early_and_skips_the_final_norm():
    model = create_backbone("mae_nano").eval()
    tokens = torch.randn(2, 16, 4)
    embedded = torch.cat([(model.cls_token + model.pos_embed[:, :1]).expand(2, -1, -1),
                          model.patch_embed(tokens) + model.pos_embed[:, 1:]], dim=1)
    torch.testing.assert_close(model.forward_features(tokens, depth=0), embedded)
    after_one = model.blocks[0](embedded)
    torch.testing.assert_close(model.forward_features(tokens, depth=1), after_one)
    full = model.norm(model.blocks[1](after_one))
    torch.testing.assert_close(model.forward_features(tokens), full)
    assert not torch.allclose(model.forward_features(tokens, depth=2), full)
    with pytest.raises(ValueError, match="depth 3"):
        model.forward_features(tokens, depth=3)


def test_hidden_decoder_positions_come_from_mask_token():
    model = create_backbone("mae_nano").eval()
    with torch.no_grad():
        model.mask_token.normal_()
    noise = torch.rand(2, 16)
    masking = masking_from_noise(noise, 4)
    latent = model.forward_encoder(torch.randn(2, 16, 4), masking)
    decoder_input = model.decoder_input(latent, masking)
    assert decoder_input.shape == (2, 17, 16)
    hidden = masking.mask
    expected = (model.mask_token[0, 0] + model.decoder_pos_embed[0, 1:]).expand(2, -1, -1)
    torch.testing.assert_close(decoder_input[:, 1:][hidden], expected[hidden])
    keep = masking.ids_keep.unsqueeze(-1).expand(-1, -1, 16)
    visible = model.decoder_embed(latent[:, 1:]) + model.decoder_pos_embed[:, 1:].expand(2, -1, -1).gather(1, keep)
    torch.testing.assert_close(decoder_input[:, 1:].gather(1, keep), visible)


def test_initialisation_follows_the_official_recipe():
    model = create_backbone("mae_nano", hidden_size=64, decoder_hidden_size=64)
    assert torch.count_nonzero(model.decoder_pred.bias) == 0 and torch.count_nonzero(model.blocks[0].attn.qkv.bias) == 0
    assert torch.count_nonzero(model.patch_embed.bias) > 0  # default Conv2d bias init, not zeroed
    assert torch.equal(model.norm.weight, torch.ones(64)) and torch.equal(model.norm.bias, torch.zeros(64))
    assert 0.005 < model.cls_token.std() < 0.05 and 0.005 < model.mask_token.std() < 0.05
    bound = (6 / (4 + 64)) ** 0.5
    assert model.patch_embed.weight.abs().max() <= bound


def test_drop_path_rises_over_encoder_blocks_only():
    model = create_backbone("mae_nano", depth=3, drop_path_rate=0.2)
    rates = [getattr(block.drop_path1, "drop_prob", 0.0) for block in model.blocks]
    assert rates == pytest.approx([0.0, 0.1, 0.2])
    assert all(not hasattr(block.drop_path1, "drop_prob") for block in model.decoder_blocks)


def test_grad_checkpointing_gives_the_same_gradients():
    model = create_backbone("mae_nano")
    tokens = torch.randn(2, 16, 4)
    masking = random_masking(2, 16, 0.75)
    model(tokens, masking=masking).square().mean().backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.set_grad_checkpointing()
    model(tokens, masking=masking).square().mean().backward()
    for grad, parameter in zip(expected, model.parameters()):
        torch.testing.assert_close(parameter.grad, grad)
