import pytest
import torch

from maskdiff.backbones import create_backbone
from maskdiff.backbones.mdt import RelativePositionBias
from maskdiff.corruption import MaskedNoise, random_masking
from maskdiff.corruption.masking import restore_tokens


def randomised(name, **kwargs):
    torch.manual_seed(0)
    model = create_backbone(name, input_size=8, in_channels=1, num_classes=10, **kwargs)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    return model.eval()


def test_registry_parameter_counts_match_the_reference():
    counts = {}
    for name in ("MDT-XL/2", "MDTv2-XL/2"):
        with torch.device("meta"):
            model = create_backbone(name)
        total = sum(p.numel() for p in model.parameters())
        counts[name] = (total, total - sum(p.numel() for p in model.sideblocks.parameters()))
    assert counts["MDT-XL/2"] == (699_778_144, 675_857_568)  # ≈699.8M training, 675.9M without the side block
    assert counts["MDTv2-XL/2"] == (742_263_904, 718_343_328)  # ≈742.3M / 718.3M
    assert create_backbone("MDTv2-S/2").decode_layer == 6 and create_backbone("MDT-S/2").decode_layer == 2


@pytest.mark.parametrize("name", ["MDT-Nano/2", "MDTv2-T/2"])
def test_masked_encoder_sees_only_the_kept_tokens(name):
    model = randomised(name)
    tokens, t, y = torch.randn(2, 16, 4), torch.tensor([5.0, 700.0]), torch.tensor([1, 2])
    masking = random_masking(2, 16, 0.5, generator=torch.Generator().manual_seed(0))
    features = model.forward_features(tokens, t, y, masking)
    assert features.shape == (2, 8, model.hidden_size)
    perturbed = tokens.clone()
    perturbed[masking.mask] += 10.0
    torch.testing.assert_close(model.forward_features(perturbed, t, y, masking), features)
    # the masked pass over the kept tokens equals an encoder pass whose bias is the full bias restricted to them
    assert not torch.allclose(model.forward_features(tokens, t, y)[:, :8], features)


def test_relative_position_bias_gathered_for_kept_tokens_is_the_restriction():
    bias = RelativePositionBias(side=4, num_heads=3)
    torch.nn.init.normal_(bias.relative_position_bias_table)
    full = bias()
    assert full.shape == (3, 16, 16)
    masking = random_masking(2, 16, 0.75, generator=torch.Generator().manual_seed(3))
    gathered = bias(masking.ids_keep)
    for b in range(2):
        keep = masking.ids_keep[b]
        torch.testing.assert_close(gathered[b], full[:, keep][:, :, keep])
    # the same relative offset gets the same bias
    assert torch.equal(full[:, 0, 1], full[:, 5, 6])


def test_side_interpolater_fills_only_hidden_positions():
    model = randomised("MDTv2-T/2")
    x = torch.randn(2, 8, model.hidden_size)
    c = torch.randn(2, model.hidden_size)
    masking = random_masking(2, 16, 0.5, generator=torch.Generator().manual_seed(0))
    out = model.enter_decoder(x, c, masking)
    expected_visible = restore_tokens(x, model.mask_token, masking) + model.decoder_pos_embed
    visible = ~masking.mask
    torch.testing.assert_close(out[visible], expected_visible[visible])  # masked shortcut: unchanged
    assert not torch.allclose(out[masking.mask], expected_visible[masking.mask])  # side block output
    torch.testing.assert_close(model.enter_decoder(torch.randn(2, 16, model.hidden_size), c, None).shape, torch.Size([2, 16, model.hidden_size]))


def test_mdtv2_decoder_sees_every_noisy_token_through_the_dense_shortcut():
    model = randomised("MDTv2-T/2")
    tokens, t, y = torch.randn(2, 16, 4), torch.tensor([5.0, 700.0]), torch.tensor([1, 2])
    masking = random_masking(2, 16, 0.5, generator=torch.Generator().manual_seed(0))
    out = model(tokens, t, y, masking)
    perturbed = tokens.clone()
    perturbed[masking.mask] += 1.0
    assert not torch.allclose(model(perturbed, t, y, masking), out)  # v2 decoder reads the full input embedding
    v1 = randomised("MDT-Nano/2")
    out1 = v1(tokens, t, y, masking)
    torch.testing.assert_close(v1(perturbed, t, y, masking), out1)  # v1 never reads hidden noisy tokens


def test_masked_noise_views():
    corruption = MaskedNoise(0.3, max_mask_ratio=0.5)
    clean = torch.randn(4, 64, 3)
    ratios = set()
    for _ in range(20):
        full, masked = corruption(clean, (8, 8))
        assert full.name == "full" and masked.name == "masked" and full.masking is None
        assert torch.equal(full.t, masked.t) and not torch.allclose(full.noise, masked.noise)
        kept = masked.masking.num_keep
        assert int(64 * 0.5) <= kept <= int(64 * 0.7) + 1
        ratios.add(kept)
    assert len(ratios) > 1  # one ratio per batch, drawn from [0.3, 0.5]
    fixed = MaskedNoise(0.3)
    assert {fixed(clean, (8, 8))[1].masking.num_keep for _ in range(5)} == {int(64 * 0.7)}
    assert len(MaskedNoise(0.3, full_pass=False)(clean, (8, 8))) == 1
    with pytest.raises(ValueError, match="0.6 and 0.4"):
        MaskedNoise(0.6, max_mask_ratio=0.4)
