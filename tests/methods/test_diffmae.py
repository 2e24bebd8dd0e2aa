"""DiffMAE: masked-only noising, an encoder on clean visible tokens, decoder variants, native inpainting, learning."""


import pytest
import torch

from maskdiff.backbones import DiffMAE as DiffMAEBackbone
from maskdiff.backbones import create_backbone
from maskdiff.backbones.diffmae import EncoderContext
from maskdiff.tools.main import main
from maskdiff.corruption import MaskedPatchNoise
from maskdiff.methods import DiffMAE
from maskdiff.samplers import DDPMSampler
from tests.helpers import CONFIGS, config_in

NANO = dict(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=2, num_heads=2,
            decoder_hidden_size=32, decoder_depth=2, decoder_num_heads=2)
VIDEO = dict(NANO, num_frames=4, tubelet=2)
DECODERS = ("joint", "cross", "cross_self")


def nano(**overrides) -> DiffMAEBackbone:
    torch.manual_seed(0)
    return DiffMAEBackbone(**{**NANO, **overrides})


def view_of(clean: torch.Tensor, grid, ratio=0.75, tube=False, seed=0):
    torch.manual_seed(seed)
    return MaskedPatchNoise(ratio, tube=tube)(clean, grid)[0]


# ---------------------------------------------------------------------------------------------- corruption
def test_only_hidden_tokens_are_noised_and_the_view_carries_the_diffusion_state():
    clean = torch.randn(6, 16, 4)
    view = view_of(clean, (4, 4))
    hidden = view.masking.mask
    assert hidden.sum(1).tolist() == [12] * 6
    torch.testing.assert_close(view.tokens[~hidden], clean[~hidden], rtol=0, atol=0)
    assert (view.noise[~hidden] == 0).all() and (view.noise[hidden] != 0).all()
    alpha, sigma = view.schedule.alpha_sigma(view.t, clean)
    torch.testing.assert_close(view.tokens, torch.where(hidden.unsqueeze(-1), alpha * clean + sigma * view.noise, clean))
    assert view.t.dtype == torch.long and torch.equal(view.model_t, view.t.float())


def test_tube_masking_hides_the_same_cells_in_every_frame():
    view = view_of(torch.randn(3, 2 * 16, 8), (2, 4, 4), ratio=0.75, tube=True)
    frames = view.masking.mask.view(3, 2, 16)
    assert torch.equal(frames[:, 0], frames[:, 1]) and frames.sum(-1).tolist() == [[12, 12]] * 3


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.5, 1.5])
def test_mask_ratio_outside_the_open_unit_interval_is_refused(ratio):
    with pytest.raises(ValueError, match=rf"mask_ratio {ratio} is outside \(0, 1\)"):
        MaskedPatchNoise(ratio)


# ---------------------------------------------------------------------------------------------- backbone
def test_encoder_sees_exactly_the_clean_visible_tokens():
    model = nano().eval()
    clean = torch.randn(2, 16, 4)
    view = view_of(clean, (4, 4))
    other = torch.where(view.masking.mask.unsqueeze(-1), torch.randn_like(clean) * 5, view.tokens)
    first = model.forward_features(view.tokens, masking=view.masking)
    torch.testing.assert_close(model.forward_features(other, masking=view.masking), first, rtol=0, atol=0)
    assert first.shape == (2, 1 + 4, 32)
    context_a = model.encode_context(view.tokens, view.masking).contexts
    context_b = model.encode_context(other, view.masking).contexts
    for a, b in zip(context_a, context_b):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # the decoder does read the noisy hidden tokens
    t = torch.full((2,), 500)
    assert not torch.allclose(model(view.tokens, t, masking=view.masking), model(other, t, masking=view.masking))
    # a visible token's content does reach the encoder
    changed = view.tokens.clone()
    changed[0, view.masking.ids_keep[0, 0]] += 1.0
    assert not torch.allclose(model.forward_features(changed, masking=view.masking)[0], first[0])
    assert model.takes_timesteps and not model.features_take_timesteps


@pytest.mark.parametrize("t_conditioning", ["add", "adaln"])
@pytest.mark.parametrize("decoder", DECODERS)
def test_every_decoder_runs_on_images_and_video_with_token_shapes(decoder, t_conditioning):
    for config, grid, tube in ((NANO, (4, 4), False), (VIDEO, (2, 4, 4), True)):
        model = nano(**{**config, "decoder": decoder, "t_conditioning": t_conditioning})
        n, p = model.patchifier.num_tokens, model.patchifier.values_per_patch
        view = view_of(torch.randn(3, n, p), grid, tube=tube)
        out = model(view.tokens, view.model_t, None, view.masking)
        assert out.shape == (3, n, p)
        assert (out[~view.masking.mask] == 0).all() and (out[view.masking.mask] != 0).any()
        out.square().mean().backward()
        # the loss reaches the encoder (adaLN-Zero: through the zero-initialised gates first)
        reached = model.decoder_blocks[0].adaLN_modulation[-1] if t_conditioning == "adaln" else model.patch_embed
        assert reached.weight.grad.abs().sum() > 0
        assert model(view.tokens, view.model_t).shape == (3, n, p)  # no masking: all hidden (generation)


def test_top_down_reads_encoder_blocks_in_reversed_depth():
    assert nano(depth=4, decoder_depth=4).context_layers() == [3, 2, 1, 0]
    assert nano(depth=4, decoder_depth=2).context_layers() == [3, 1]
    assert nano(top_down=False).context_layers() == [None, None]
    assert nano(decoder="joint").top_down is False


def test_video_positions_separate_time_from_space():
    model = nano(**VIDEO)
    t, h, w = model.patchifier.grid
    table = model.pos_embed[0, 1:].view(t, h * w, -1)
    dim_t = int(32 * 0.25) // 2 * 2
    temporal, spatial = table[..., :dim_t], table[..., dim_t:]
    torch.testing.assert_close(spatial[0], spatial[1])  # same cell, different frames: same spatial part
    torch.testing.assert_close(temporal[0, 0].expand(h * w, -1), temporal[0])  # same frame: same temporal part
    assert not torch.allclose(temporal[0], temporal[1]) and not torch.allclose(spatial[0, 0], spatial[0, 1])


def test_bad_configurations_name_the_value():
    with pytest.raises(ValueError, match=r"unknown decoder 'mixed'.*'joint', 'cross', 'cross_self'"):
        nano(decoder="mixed")
    with pytest.raises(ValueError, match=r"unknown t_conditioning 'film'"):
        nano(t_conditioning="film")
    with pytest.raises(ValueError, match=r"clip length 1 is shorter than the tubelet 2"):
        nano(num_frames=1, tubelet=2)
    with pytest.raises(ValueError, match="joint decoder has none"):
        nano(decoder="joint", top_down=True)
    with pytest.raises(ValueError, match="needs the timesteps"):
        nano()(torch.randn(1, 16, 4))


def test_registered_sizes_build():
    assert create_backbone("diffmae_nano").decoder == "cross_self"
    assert create_backbone("diffmae_vit_tiny_patch4").patchifier.num_tokens == 16


# ---------------------------------------------------------------------------------------------- method
def test_loss_covers_only_the_hidden_tokens():
    method = DiffMAE(nano())
    assert method.objective.prediction == "x0" and method.objective.region == "masked"
    assert method.corruption.mask_ratio == 0.75 and method.corruption.schedule.num_steps == 1000
    clean = torch.randn(4, 16, 4)
    view = view_of(clean, (4, 4))
    prediction = view.clean.clone()
    prediction[~view.masking.mask] += 10.0  # errors at visible tokens are not scored
    assert method.objective(prediction, view).loss.item() == 0.0
    prediction[view.masking.mask] += 1.0
    assert method.objective(prediction, view).loss.item() == pytest.approx(1.0)


def test_a_non_diffmae_backbone_is_refused():
    with pytest.raises(ValueError, match="denoises the noised values of hidden tokens, but backbone MAE drops"):
        DiffMAE(create_backbone("mae_nano"))


def test_native_inpainting_keeps_visible_patches_and_encodes_once():
    torch.manual_seed(0)
    method = DiffMAE(nano(), sampler=DDPMSampler(steps=5))
    calls = []
    method.backbone.patch_embed.register_forward_hook(lambda *_: calls.append(1))
    images = torch.rand(3, 1, 8, 8) * 2 - 1
    pixel_mask = torch.zeros(3, 1, 8, 8, dtype=torch.bool)
    pixel_mask[:, :, :4] = True  # top half: 8 of 16 tokens in every image
    out = method.inpaint(images, pixel_mask, generator=torch.Generator().manual_seed(0))
    assert len(calls) == 1  # one encoder pass for the batch, 5 decoder steps
    torch.testing.assert_close(out[~pixel_mask.expand_as(images)], images[~pixel_mask.expand_as(images)], rtol=0, atol=0)
    assert out.shape == images.shape and out.abs().max() <= 1.0
    again = method.inpaint(images, pixel_mask, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, again)
    # rows with different hidden counts: one encoder pass per group of equal counts
    calls.clear()
    pixel_mask[0, :, 4:6] = True
    method.inpaint(images, pixel_mask, generator=torch.Generator().manual_seed(0))
    assert len(calls) == 2


def test_video_inpainting_by_tokens():
    method = DiffMAE(nano(**VIDEO), sampler=DDPMSampler(steps=3))
    tokens = torch.randn(2, 32, 8)
    hidden = torch.zeros(2, 32, dtype=torch.bool)
    hidden[:, 16:] = True  # the second frame-pair
    filled = method.inpaint_tokens(tokens, hidden, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(filled[~hidden], tokens[~hidden], rtol=0, atol=0)
    assert not torch.allclose(filled[hidden], tokens[hidden])
    with pytest.raises(ValueError, match="inpaint_tokens"):
        method.inpaint(torch.zeros(2, 1, 8, 8), torch.ones(2, 8, 8, dtype=torch.bool))


class BlindDiffMAE(DiffMAEBackbone):
    """Its decoder gets a zeroed encoder context: it cannot use the visible tokens."""

    def encode_context(self, tokens, masking) -> EncoderContext:
        context = super().encode_context(tokens, masking)
        return EncoderContext([torch.zeros_like(c) for c in context.contexts], context.masking)


def train_loss(backbone_class, steps=40) -> float:
    """x0 loss after ``steps`` Adam steps on images whose pixels are one random level each: the hidden tokens are
    predictable from the visible ones, and only partly from the noisy hidden tokens themselves."""
    torch.manual_seed(0)
    method = DiffMAE(backbone_class(**NANO, decoder="cross_self"))
    levels = torch.rand(32, 1, 1, 1) * 2 - 1
    images = levels.expand(32, 1, 8, 8).contiguous()
    optimizer = torch.optim.Adam(method.backbone.parameters(), lr=3e-3)
    for _ in range(steps):
        optimizer.zero_grad()
        method.step_loss(images, None).loss.backward()
        optimizer.step()
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(123)
        return sum(method.step_loss(images, None).loss.item() for _ in range(4)) / 4


def test_the_decoder_learns_from_the_encoder(one_thread):
    seeing, blind = train_loss(DiffMAEBackbone), train_loss(BlindDiffMAE)
    assert seeing < 0.5 * blind, (seeing, blind)


def test_two_step_fit_through_the_cli(tmp_path, digits_cache):
    config, _ = config_in(tmp_path, CONFIGS / "diffmae" / "diffmae_digits.yaml")
    main(["fit", "--config", str(config), "--trainer.fast_dev_run", "2", "--trainer.logger", "false"])
