import numpy as np
import pytest
import torch
from PIL import Image

from maskdiff.backbones import DiT as DiTBackbone
from maskdiff.backbones import create_backbone
from maskdiff.backbones.mae import MAE_SIZES
from maskdiff.methods.checkpoints import write_method_checkpoint
from maskdiff.tools.main import main
from maskdiff.corruption.masking import masking_from_noise
from maskdiff.inpainting import as_pixel_mask, load_mask, make_mask, token_mask
from maskdiff.methods import MAE, DiT
from maskdiff.objectives import MaskedReconstruction
from maskdiff.samplers import DDIMSampler

pytestmark = pytest.mark.usefixtures("one_thread")

TILE = 65  # an 8-px image upscaled to 64 px plus the grid's 1-px padding


def tiny_dit(**overrides) -> DiT:
    """A random 1-block DiT on 8x8 grayscale pixels (patch 2: a 4x4 token grid)."""
    torch.manual_seed(0)
    config = {"input_size": 8, "patch_size": 2, "in_channels": 1, "hidden_size": 32, "depth": 1, "num_heads": 2,
              "num_classes": 10, **overrides}
    return DiT(backbone=DiTBackbone(**config), clip_x0=1.0).eval()


def random_images(batch: int, channels: int = 1, size: int = 8) -> torch.Tensor:
    return torch.rand(batch, channels, size, size, generator=torch.Generator().manual_seed(1)) * 2 - 1


def test_a_masked_pixel_marks_its_whole_token():
    pixel_mask = torch.zeros(2, 1, 8, 8, dtype=torch.bool)
    pixel_mask[0, 0, 5, 2] = True  # row 5, column 2: token (2, 1) of the 4x4 grid of 2-px tokens
    pixel_mask[1, 0, 0:2, 6:8] = True  # exactly token (0, 3)
    tokens = token_mask(pixel_mask, 2)
    assert tokens.shape == (2, 16)
    assert tokens[0].nonzero().flatten().tolist() == [2 * 4 + 1]
    assert tokens[1].nonzero().flatten().tolist() == [3]
    assert token_mask(pixel_mask[:, 0], 4)[0].nonzero().flatten().tolist() == [2]  # (B, H, W) and 4-px tokens
    with pytest.raises(ValueError, match="8x8 mask does not split into tokens of 3x3"):
        token_mask(pixel_mask, 3)


def test_pixel_mask_shapes_are_checked_and_a_single_mask_broadcasts():
    images = random_images(3)
    assert as_pixel_mask(torch.ones(8, 8), images).shape == (3, 1, 8, 8)
    assert as_pixel_mask(torch.ones(3, 8, 8), images).dtype == torch.bool
    with pytest.raises(ValueError, match=r"pixel mask of shape \(2, 8, 8\) does not fit images of shape \(3, 1, 8, 8\)"):
        as_pixel_mask(torch.ones(2, 8, 8), images)


def test_pixel_model_keeps_known_pixels_exactly_and_never_reads_the_masked_ones():
    method = tiny_dit()
    images = random_images(2)
    pixel_mask = make_mask("box", 8, box=(0.125, 0.125, 0.5, 0.625))  # rows 1-4, columns 1-3: cuts through tokens
    labels = torch.tensor([3, 7])

    def run(inputs):
        return method.inpaint(inputs, pixel_mask, labels, sampler=DDIMSampler(4), generator=torch.Generator().manual_seed(0))

    out = run(images)
    assert out.shape == images.shape
    known = ~pixel_mask.expand_as(images)
    assert torch.equal(out[known], images[known])
    assert (out[~known] != images[~known]).float().mean() > 0.9
    scribbled = torch.where(pixel_mask, torch.ones_like(images), images)
    torch.testing.assert_close(run(scribbled), out, rtol=0, atol=0)


def test_latent_model_keeps_known_pixels_exactly_though_the_vae_round_trip_is_lossy(tmp_path):
    diffusers = pytest.importorskip("diffusers", reason="the latent extra (diffusers) is part of the test extra")
    from maskdiff.autoencoders import StableDiffusionVAE

    torch.manual_seed(0)
    diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 16), latent_channels=4,
        norm_num_groups=4, layers_per_block=1, sample_size=16,
    ).save_pretrained(tmp_path)
    vae = StableDiffusionVAE(str(tmp_path), scale_factor=0.5, sample=False)
    backbone = DiTBackbone(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=2, num_classes=0)
    method = DiT(backbone=backbone, autoencoder=vae).eval()
    images = random_images(2, channels=3, size=16)
    pixel_mask = make_mask("half", 16, side="right")
    out = method.inpaint(images, pixel_mask, sampler=DDIMSampler(3), generator=torch.Generator().manual_seed(0))
    known = ~pixel_mask.expand_as(images)
    assert out.shape == images.shape
    assert torch.equal(out[known], images[known])
    assert (out[~known] != images[~known]).float().mean() > 0.9
    assert not torch.allclose(vae.decode(vae.encode(images))[known], images[known], atol=1e-3)


@pytest.mark.parametrize(
    ("kind", "options", "share", "generated", "kept"),
    [
        ("box", {"box": (0.0, 0.0, 0.5, 0.25)}, 32 / 256, (slice(0, 4), slice(0, 8)), (slice(4, 16), slice(None))),
        ("box", {"ratio": 0.25}, 0.25, (slice(4, 12), slice(4, 12)), (slice(0, 4), slice(None))),
        ("half", {"side": "left"}, 0.5, (slice(None), slice(0, 8)), (slice(None), slice(8, 16))),
        ("half", {"side": "bottom"}, 0.5, (slice(8, 16), slice(None)), (slice(0, 8), slice(None))),
        ("outpaint", {"ratio": 0.75}, 0.75, (slice(0, 4), slice(None)), (slice(4, 12), slice(4, 12))),
    ],
)
def test_mask_kinds_have_their_share_and_geometry(kind, options, share, generated, kept):
    mask = make_mask(kind, 16, **options)
    assert mask.shape == (16, 16) and mask.dtype == torch.bool
    assert mask.float().mean().item() == pytest.approx(share)
    assert mask[generated].all() and not mask[kept].any()


def test_random_mask_is_patch_aligned_seeded_and_has_the_ratio():
    def draw(seed):
        return make_mask("random", 16, ratio=0.75, patch=4, generator=torch.Generator().manual_seed(seed))

    mask = draw(0)
    cells = mask.view(4, 4, 4, 4).permute(0, 2, 1, 3).flatten(2)  # (grid row, grid column, 16 pixels)
    assert (cells.all(-1) | ~cells.any(-1)).all()
    assert cells[..., 0].sum() == 12 and mask.float().mean() == 0.75
    assert torch.equal(draw(0), mask) and not torch.equal(draw(1), mask)


@pytest.mark.parametrize("ratio", [0.0, 1.0, 1.5, -0.2])
@pytest.mark.parametrize("kind", ["random", "box", "outpaint"])
def test_a_ratio_outside_zero_one_is_refused(kind, ratio):
    with pytest.raises(ValueError, match=rf"mask ratio {ratio} is outside \(0, 1\)"):
        make_mask(kind, 16, ratio=ratio, patch=4)


def test_unknown_kind_side_and_bad_box_are_refused():
    with pytest.raises(ValueError, match="unknown mask kind 'circle'; expected one of random, box, half, outpaint"):
        make_mask("circle", 16)
    with pytest.raises(ValueError, match="unknown side 'up' for a half mask; expected one of left, right, top, bottom"):
        make_mask("half", 16, side="up")
    with pytest.raises(ValueError, match=r"box \(0.5, 0.0, 0.25, 1.0\) is not \(x0, y0, x1, y1\)"):
        make_mask("box", 16, box=(0.5, 0.0, 0.25, 1.0))
    with pytest.raises(ValueError, match=r"box \(0.5, 0.5\) is not \(x0, y0, x1, y1\)"):
        make_mask("box", 16, box=(0.5, 0.5))
    with pytest.raises(ValueError, match=r"box \(0.5, 0.5, 0.52, 0.52\) covers no pixel of a 16x16 image"):
        make_mask("box", 16, box=(0.5, 0.5, 0.52, 0.52))


def test_mask_png_is_resized_nearest_and_bad_masks_name_the_path(tmp_path):
    pixels = np.zeros((20, 40), dtype=np.uint8)  # height 20, width 40
    pixels[:, 10:15] = 255  # after the centre crop to columns 10-29 and a /1.25 resize: columns 0-3 of 16
    path = tmp_path / "mask.png"
    Image.fromarray(pixels).save(path)
    mask = load_mask(path, 16, source_size=(40, 20))
    assert mask.shape == (16, 16)
    assert mask[:, :4].all() and not mask[:, 4:].any()

    with pytest.raises(ValueError, match=rf"mask {path} is 40x20 \(width x height\) but the image is 8x8"):
        load_mask(path, 16, source_size=(8, 8))
    with pytest.raises(ValueError, match=f"cannot read mask {tmp_path / 'missing.png'}"):
        load_mask(tmp_path / "missing.png", 16)
    empty = tmp_path / "empty.png"
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(empty)
    with pytest.raises(ValueError, match=rf"mask {empty} \(8x8\) marks no pixel to generate"):
        load_mask(empty, 16)


def test_inpaint_command_writes_a_panel_keeping_the_known_half(dit_ckpt, tmp_path, capsys):
    out = tmp_path / "panel.png"
    main(["inpaint", "--ckpt", str(dit_ckpt), "--image", "digits:0", "--mask_kind", "half", "--side", "left",
          "--samples", "2", "--sampler", "ddim", "--steps", "4", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "50.0% of pixels masked, 8/16 tokens generated" in printed and "2 result(s), ddim-4" in printed
    panel = np.array(Image.open(out).convert("L")).astype(int)
    assert panel.shape == (TILE + 1, 4 * TILE + 1)  # input, masked input, 2 results; 8 px upscaled to 64
    tiles = [panel[1:TILE, 1 + k * TILE:(k + 1) * TILE] for k in range(4)]
    source, greyed, first, second = tiles
    assert (greyed[:, :32] == 128).all() and np.array_equal(greyed[:, 32:], source[:, 32:])
    for result in (first, second):
        assert np.array_equal(result[:, 32:], source[:, 32:])
    assert not np.array_equal(first[:, :32], second[:, :32])


def test_repaint_calls_back_once_per_step_of_its_one_chain():
    method = tiny_dit()
    masks = torch.stack([make_mask("half", 8), make_mask("box", 8)])  # different token counts, still one chain
    calls = []
    method.inpaint(random_images(2), masks, sampler=DDIMSampler(3), callback=lambda step, x, output: calls.append(step))
    assert method.inpainting_steps(token_mask(masks, 2), DDIMSampler(3)) == len(calls) == 3 and calls == [2, 1, 0]


@pytest.fixture
def mae_nano() -> MAE:
    torch.manual_seed(0)
    return MAE(backbone=create_backbone("mae_nano")).eval()


def test_mae_fills_hidden_tokens_with_one_decoder_pass(mae_nano):
    images = random_images(2)
    pixel_mask = make_mask("half", 8, side="top")
    out = mae_nano.inpaint(images, pixel_mask)
    known = ~pixel_mask.expand_as(images)
    assert torch.equal(out[known], images[known])
    tokens = mae_nano.to_tokens(images)
    hidden = token_mask(pixel_mask[None], 2).expand(2, -1)
    with torch.no_grad():
        prediction = mae_nano.backbone(tokens, masking=masking_from_noise(hidden.float(), 8))
    expected = mae_nano.patchifier.unpatchify(torch.where(hidden.unsqueeze(-1), prediction, tokens))
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(mae_nano.inpaint(torch.where(pixel_mask, 1.0, images), pixel_mask), out)


def test_mae_masks_with_different_token_counts_are_inpainted_row_by_row(mae_nano):
    images = random_images(2)
    masks = torch.stack([make_mask("half", 8, side="left"), make_mask("box", 8, box=(0.0, 0.0, 0.25, 0.25))])
    together = mae_nano.inpaint(images, masks)
    for row in range(2):
        torch.testing.assert_close(together[row:row + 1], mae_nano.inpaint(images[row:row + 1], masks[row]))


def test_norm_pix_mae_does_not_read_the_hidden_patches():
    torch.manual_seed(0)
    method = MAE(backbone=create_backbone("mae_nano"), objective=MaskedReconstruction(norm_pix=True, region="masked"))
    images = random_images(1)
    pixel_mask = make_mask("outpaint", 8, ratio=0.75)
    out = method.inpaint(images, pixel_mask)
    torch.testing.assert_close(method.inpaint(torch.where(pixel_mask, -1.0, images), pixel_mask), out)


def test_inpaint_command_with_an_mae_checkpoint(mae_nano, tmp_path, capsys):
    backbone = {"class_path": "maskdiff.backbones.MAE", "init_args": MAE_SIZES["mae_nano"]}
    ckpt = write_method_checkpoint(tmp_path / "mae.ckpt", "maskdiff.methods.MAE", {"backbone": backbone}, mae_nano.state_dict())
    out = tmp_path / "panel.png"
    main(["inpaint", "--ckpt", str(ckpt), "--image", "digits:5", "--mask_kind", "random", "--mask_ratio", "0.75",
          "--out", str(out)])
    captured = capsys.readouterr()
    assert "12/16 tokens generated" in captured.out and "one-step reconstruction" in captured.out
    assert "drawing 1 result, not 4" in captured.err
    assert Image.open(out).size == (3 * TILE + 1, TILE + 1)


def test_inpaint_command_names_a_bad_digit_index(dit_ckpt, tmp_path):
    with pytest.raises(ValueError, match=r"image 'digits:300': expected digits:IDX with IDX in \[0, 300\)"):
        main(["inpaint", "--ckpt", str(dit_ckpt), "--image", "digits:300", "--out", str(tmp_path / "panel.png")])
