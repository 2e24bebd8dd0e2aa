"""Video inpainting (``maskdiff inpaint --video``), its masks and clip I/O, and the two-checkpoint comparison panel."""

import numpy as np
import pytest
import torch
from PIL import Image

from maskdiff.backbones import DiffMAE as DiffMAEBackbone
from maskdiff.backbones import create_backbone
from maskdiff.backbones.mae import MAE_SIZES
from maskdiff.methods.checkpoints import write_method_checkpoint
from maskdiff.tools.main import main
from maskdiff.corruption import MaskedPatchNoise
from maskdiff.diffusion.schedules import NoiseSchedule
from maskdiff.inpainting import token_mask
from maskdiff.samplers import FirstStepSampler
from maskdiff.inpainting.panels import label_width
from maskdiff.inpainting.video import (
    fit_clip,
    inpaint_clip,
    make_video_mask,
    read_video_frames,
    write_animation,
)
from maskdiff.methods import MAE, DiffMAE
from maskdiff.samplers import DDPMSampler
from maskdiff.samplers.denoiser import DenoiserOutput

pytestmark = pytest.mark.usefixtures("one_thread")

TILE = 65  # an 8-px frame upscaled to 64 px plus the grid's 1-px padding
VIDEO_BACKBONE = {"input_size": 8, "patch_size": 2, "in_channels": 1, "num_frames": 4, "tubelet": 2, "hidden_size": 32,
                  "depth": 1, "num_heads": 2, "decoder_hidden_size": 32, "decoder_depth": 1, "decoder_num_heads": 2}
IMAGE_BACKBONE = {key: value for key, value in VIDEO_BACKBONE.items() if key not in ("num_frames", "tubelet")}


def diffmae_checkpoint(path, backbone: dict, tube: bool):
    """An untrained (seeded) tiny DiffMAE written as a maskdiff checkpoint; returns (path, method)."""
    torch.manual_seed(0)
    corruption = {"mask_ratio": 0.9 if tube else 0.75, "tube": tube}
    method = DiffMAE(backbone=DiffMAEBackbone(**backbone), corruption=MaskedPatchNoise(**corruption),
                     sampler=DDPMSampler(4), ema_decay=None).eval()
    init_args = {
        "backbone": {"class_path": "maskdiff.backbones.DiffMAE", "init_args": backbone},
        "corruption": {"class_path": "maskdiff.corruption.MaskedPatchNoise", "init_args": corruption},
        "sampler": {"class_path": "maskdiff.samplers.DDPMSampler", "init_args": {"steps": 4}},
        "ema_decay": None,
    }
    return write_method_checkpoint(path, "maskdiff.methods.DiffMAE", init_args, method.state_dict()), method


@pytest.fixture
def video_ckpt(tmp_path):
    return diffmae_checkpoint(tmp_path / "video.ckpt", VIDEO_BACKBONE, tube=True)[0]


@pytest.fixture
def image_diffmae_ckpt(tmp_path):
    return diffmae_checkpoint(tmp_path / "diffmae.ckpt", IMAGE_BACKBONE, tube=False)[0]


@pytest.fixture
def mae_ckpt(tmp_path):
    torch.manual_seed(0)
    method = MAE(backbone=create_backbone("mae_nano"))
    backbone = {"class_path": "maskdiff.backbones.MAE", "init_args": MAE_SIZES["mae_nano"]}
    return write_method_checkpoint(tmp_path / "mae.ckpt", "maskdiff.methods.MAE", {"backbone": backbone}, method.state_dict())


def tiles_of(panel: np.ndarray, rows: int, columns: int, margin: int = 0) -> list[list[np.ndarray]]:
    """The ``rows x columns`` tiles (64x64, padding removed) of a panel with a label margin on the left."""
    return [[panel[1 + r * TILE:(r + 1) * TILE, margin + 1 + c * TILE:margin + (c + 1) * TILE] for c in range(columns)]
            for r in range(rows)]


# ---------------------------------------------------------------------------------------------- masks
def test_tube_mask_hides_the_same_cells_in_every_frame_with_trainings_count():
    mask = make_video_mask("tube", 16, 32, tubelet=2, token_pixels=4, ratio=0.9, generator=torch.Generator().manual_seed(0))
    assert mask.shape == (16, 32, 32) and mask.dtype == torch.bool
    assert all(torch.equal(frame, mask[0]) for frame in mask)
    tokens = token_mask(mask, 4, tubelet=2)
    assert tokens.shape == (1, 8 * 8 * 8)
    assert tokens.view(8, 64).sum(1).tolist() == [58] * 8  # 64 - int(64 * 0.1): MaskedPatchNoise's tube count
    again = make_video_mask("tube", 16, 32, 2, 4, 0.9, generator=torch.Generator().manual_seed(0))
    other = make_video_mask("tube", 16, 32, 2, 4, 0.9, generator=torch.Generator().manual_seed(1))
    assert torch.equal(again, mask) and not torch.equal(other, mask)


def test_random_space_time_mask_differs_across_time_and_stays_token_aligned():
    mask = make_video_mask("random", 8, 16, tubelet=2, token_pixels=4, ratio=0.75, generator=torch.Generator().manual_seed(0))
    tokens = token_mask(mask, 4, tubelet=2)
    assert int(tokens.sum()) == 64 - int(64 * 0.25)
    assert mask.float().mean() == tokens.float().mean()  # whole tokens only
    assert torch.equal(mask[0], mask[1]) and not torch.equal(mask[0], mask[2])  # one tubelet spans frames 0-1


def test_future_box_and_half_masks():
    future = make_video_mask("future", 8, 16, 2, 4, future_frames=3)
    assert not future[:5].any() and future[5:].all()
    assert make_video_mask("future", 8, 16, 2, 4)[4:].all() and not make_video_mask("future", 8, 16, 2, 4)[:4].any()
    box = make_video_mask("box", 4, 16, 2, 4, box=(0.0, 0.0, 0.5, 0.25))
    assert all(frame[:4, :8].all() and frame.sum() == 32 for frame in box)
    half = make_video_mask("half", 4, 16, 2, 4, side="right")
    assert half[:, :, 8:].all() and not half[:, :, :8].any()


def test_a_tubelet_is_generated_when_any_of_its_pixels_is():
    mask = torch.zeros(4, 8, 8, dtype=torch.bool)
    mask[3, 5, 2] = True  # frame 3 = tubelet 1; row 5, column 2 = cell (2, 1) of the 4x4 grid of 2-px tokens
    assert token_mask(mask, 2, tubelet=2)[0].nonzero().flatten().tolist() == [16 + 2 * 4 + 1]
    with pytest.raises(ValueError, match="a 4x8x8 mask does not split into tokens of 3x2x2"):
        token_mask(mask, 2, tubelet=3)


@pytest.mark.parametrize("ratio", [0.0, 1.0, 1.2])
@pytest.mark.parametrize("kind", ["tube", "random"])
def test_video_mask_ratio_outside_zero_one_is_refused(kind, ratio):
    with pytest.raises(ValueError, match=rf"mask ratio {ratio} is outside \(0, 1\)"):
        make_video_mask(kind, 4, 8, 2, 2, ratio=ratio)


def test_bad_video_mask_options_are_named():
    with pytest.raises(ValueError, match=r"future_frames 4 is outside \[1, 4\)"):
        make_video_mask("future", 4, 8, 2, 2, future_frames=4)
    with pytest.raises(ValueError, match="unknown video mask kind 'circle'; expected one of tube, random, box"):
        make_video_mask("circle", 4, 8, 2, 2)


# ---------------------------------------------------------------------------------------------- clips
def test_clips_are_cut_cropped_and_short_ones_refused_naming_both_lengths():
    frames = np.arange(6 * 12 * 16, dtype=np.int64).reshape(6, 12, 16) % 256
    clip = fit_clip(frames.astype(np.uint8), 4, 8, 1, start_frame=1, tubelet=2)
    assert clip.shape == (1, 4, 8, 8) and clip.min() >= -1 and clip.max() <= 1
    with pytest.raises(ValueError, match=r"the clip has 6 frames; from start frame 3 that leaves 3, but the model "
                                         r"expects clips of 4 frames \(tubelet 2\)"):
        fit_clip(frames.astype(np.uint8), 4, 8, 1, start_frame=3, tubelet=2)


def test_gif_mp4_and_frame_folders_read_back(tmp_path):
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, size=(5, 10, 14), dtype=np.uint8)
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    gif = write_animation(rgb, tmp_path / "clip.gif", fps=5)
    assert np.array_equal(read_video_frames(gif, 1), grey)  # grey GIFs are lossless
    assert Image.open(gif).info["duration"] == 200
    mp4 = write_animation(rgb, tmp_path / "clip.mp4", fps=5)
    decoded = read_video_frames(mp4, 1)
    assert decoded.shape == (5, 10, 14)  # even sides are padded on write, but 10x14 is already even
    folder = tmp_path / "frames"
    folder.mkdir()
    for index, frame in enumerate(grey):
        Image.fromarray(frame).save(folder / f"{index:03d}.png")
    assert np.array_equal(read_video_frames(folder, 1), grey)
    with pytest.raises(ValueError, match="must end in .gif or .mp4"):
        write_animation(rgb, tmp_path / "clip.avi")
    with pytest.raises(ValueError, match=f"cannot read video {tmp_path / 'missing.mp4'}"):
        read_video_frames(tmp_path / "missing.mp4", 1)


def test_inpaint_clip_keeps_known_pixels_and_never_reads_hidden_ones():
    torch.manual_seed(0)
    method = DiffMAE(backbone=DiffMAEBackbone(**VIDEO_BACKBONE), corruption=MaskedPatchNoise(0.9, tube=True),
                     sampler=DDPMSampler(3), ema_decay=None).eval()
    clip = torch.rand(1, 4, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    mask = make_video_mask("tube", 4, 8, 2, 2, 0.5, generator=torch.Generator().manual_seed(0))
    mask[1, 0, 0] = True  # a single pixel: its whole tubelet is generated, the pixel's neighbours stay exact

    def run(inputs):
        return inpaint_clip(method, inputs, mask, samples=2, generator=torch.Generator().manual_seed(0))

    out = run(clip)
    assert out.shape == (2, 1, 4, 8, 8)
    known = ~mask.expand_as(out[0])
    assert all(torch.equal(sample[known], clip[known]) for sample in out)
    assert (out[:, ~known] != clip[~known]).float().mean() > 0.9
    assert not torch.equal(out[0], out[1])
    torch.testing.assert_close(run(torch.where(mask, 1.0, clip)), out, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------- command
def test_video_command_writes_a_gif_and_a_strip_keeping_known_pixels(video_ckpt, tmp_path, capsys):
    out = tmp_path / "clip.gif"
    main(["inpaint", "--ckpt", str(video_ckpt), "--video", "moving_digits:3", "--mask_kind", "tube", "--mask_ratio",
          "0.5", "--samples", "2", "--steps", "3", "--fps", "5", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "moving_digits:3 (label" in printed and "4 frames at 8x8 (tubelet 2)" in printed
    assert "tube mask (ratio 0.5)" in printed and "16/32 tokens generated" in printed and "ddpm-3" in printed

    strip = np.array(Image.open(tmp_path / "clip_strip.png").convert("L")).astype(int)
    margin = label_width(["original", "masked", "DiffMAE #1", "DiffMAE #2"])
    assert strip.shape == (4 * TILE + 1, margin + 4 * TILE + 1)  # rows: original, masked, 2 samples; 4 frames
    tiles = tiles_of(strip, 4, 4, margin)
    original, masked, first, second = tiles
    hidden = [tile == 128 for tile in masked]  # greyed pixels (0 in [-1, 1])
    assert all(np.array_equal(hidden[0], h) for h in hidden)  # tube: the same cells in every frame
    assert 0.4 < np.mean(hidden[0]) < 0.6
    for sample in (first, second):
        for frame in range(4):
            assert np.array_equal(sample[frame][~hidden[frame]], original[frame][~hidden[frame]])
    assert not np.array_equal(first[0][hidden[0]], second[0][hidden[0]])

    gif = Image.open(out)
    assert gif.n_frames == 4 and gif.info["duration"] == 200  # GIF delays are in 10-ms units
    gif.seek(2)
    frame = np.array(gif.convert("L")).astype(int)
    row_margin = label_width(["DiffMAE"])
    source, greyed, sample, _ = tiles_of(frame, 1, 4, row_margin)[0]
    assert np.array_equal(source, original[2]) and np.array_equal(greyed, masked[2])
    assert np.array_equal(sample, first[2])


def test_video_command_future_mask_and_mp4_output(video_ckpt, tmp_path, capsys):
    out = tmp_path / "future.mp4"
    main(["inpaint", "--ckpt", str(video_ckpt), "--video", "moving_digits:0", "--mask_kind", "future",
          "--future_frames", "2", "--samples", "1", "--steps", "2", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "future mask (last 2 frames)" in printed and "16/32 tokens generated" in printed
    assert read_video_frames(out, 1).shape[0] == 4
    strip = np.array(Image.open(tmp_path / "future_strip.png").convert("L")).astype(int)
    margin = label_width(["original", "masked", "DiffMAE #1"])
    original, masked, sample = tiles_of(strip, 3, 4, margin)
    assert np.array_equal(sample[0], original[0]) and np.array_equal(sample[1], original[1])
    assert (masked[2] == 128).all() and (masked[3] == 128).all()


def test_video_command_reads_a_frames_folder_and_refuses_a_short_one(video_ckpt, tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    for index in range(3):
        Image.fromarray(np.full((20, 30), 40 * index, dtype=np.uint8)).save(folder / f"{index}.png")
    with pytest.raises(ValueError, match=r"the clip has 3 frames; from start frame 0 that leaves 3, but the model "
                                         r"expects clips of 4 frames \(tubelet 2\)"):
        main(["inpaint", "--ckpt", str(video_ckpt), "--video", str(folder), "--out", str(tmp_path / "x.gif")])
    Image.fromarray(np.full((20, 30), 200, dtype=np.uint8)).save(folder / "3.png")
    out = tmp_path / "folder.gif"
    main(["inpaint", "--ckpt", str(video_ckpt), "--video", str(folder), "--samples", "1", "--steps", "2", "--out", str(out)])
    assert Image.open(out).n_frames == 4


def test_video_command_errors_name_the_bad_value(video_ckpt, mae_ckpt, tmp_path):
    gif = str(tmp_path / "x.gif")
    with pytest.raises(ValueError, match=r"mae.ckpt is an image model \(input \(1, 8, 8\), no frames\); --video needs a video model"):
        main(["inpaint", "--ckpt", str(mae_ckpt), "--video", "moving_digits:0", "--out", gif])
    with pytest.raises(ValueError, match=r"video.ckpt is a video model \(input \(1, 4, 8, 8\)\); pass the clip with --video"):
        main(["inpaint", "--ckpt", str(video_ckpt), "--image", "digits:0", "--out", str(tmp_path / "x.png")])
    with pytest.raises(ValueError, match=r"mask ratio 1.5 is outside \(0, 1\)"):
        main(["inpaint", "--ckpt", str(video_ckpt), "--video", "moving_digits:0", "--mask_ratio", "1.5", "--out", gif])
    with pytest.raises(ValueError, match=r"video output .*x.png must end in .gif or .mp4"):
        main(["inpaint", "--ckpt", str(video_ckpt), "--video", "moving_digits:0", "--out", str(tmp_path / "x.png")])
    with pytest.raises(ValueError, match=r"video 'moving_digits:200': expected moving_digits:IDX with IDX in \[0, 200\)"):
        main(["inpaint", "--ckpt", str(video_ckpt), "--video", "moving_digits:200", "--out", gif])
    with pytest.raises(ValueError, match="pass exactly one of --image"):
        main(["inpaint", "--ckpt", str(video_ckpt), "--out", gif])


# ---------------------------------------------------------------------------------------------- comparison
def test_compare_panel_puts_both_models_on_the_same_mask(image_diffmae_ckpt, mae_ckpt, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MASKDIFF_PROGRESS", "1")
    monkeypatch.delenv("RANK", raising=False)
    out = tmp_path / "compare.png"
    main(["inpaint", "--ckpt", str(image_diffmae_ckpt), "--compare_ckpt", str(mae_ckpt), "--image", "digits:7",
          "--mask_kind", "random", "--mask_ratio", "0.75", "--samples", "3", "--steps", "3", "--out", str(out)])
    captured = capsys.readouterr()
    assert "12/16 tokens generated" in captured.out
    assert "inpainting with DiffMAE" in captured.err and "3/3" in captured.err  # one hidden chain of 3 steps
    assert "inpainting with MAE" not in captured.err  # a one-pass reconstruction has no steps to show
    assert "DiffMAE: unconditional, 3 result(s), ddpm-3" in captured.out and "MAE: unconditional, 1 result(s), one-step" in captured.out
    panel = np.array(Image.open(out).convert("L")).astype(int)
    margin = label_width(["DiffMAE", "MAE"])
    assert panel.shape == (2 * TILE + 1, margin + 5 * TILE + 1)  # input, masked, 3 samples; MAE's row padded white
    diffmae, mae = tiles_of(panel, 2, 5, margin)
    assert np.array_equal(diffmae[0], mae[0]) and np.array_equal(diffmae[1], mae[1])  # same image, same mask
    hidden = diffmae[1] == 128
    assert 0.7 < hidden.mean() <= 0.75
    for result in [*diffmae[2:], mae[2]]:
        assert np.array_equal(result[~hidden], diffmae[0][~hidden])
    assert (mae[3] == 255).all() and (mae[4] == 255).all()
    assert (panel[:, :margin] < 128).any()  # the labels are drawn


def test_inpainting_steps_count_one_hidden_chain_per_number_of_hidden_tokens(tmp_path):
    method = diffmae_checkpoint(tmp_path / "diffmae.ckpt", IMAGE_BACKBONE, tube=False)[1]
    hidden = torch.zeros(3, 16, dtype=torch.bool)
    hidden[0, :4], hidden[1, :6], hidden[2, 8:12] = True, True, True  # 4, 6 and 4 hidden tokens: two chains
    calls = []
    method.inpaint_tokens(torch.zeros(3, 16, 4), hidden, sampler=DDPMSampler(3),
                          callback=lambda step, x, output: calls.append(step))
    assert method.inpainting_steps(hidden, DDPMSampler(3)) == len(calls) == 6
    assert method.inpainting_steps(hidden) == 8  # the checkpoint's DDPM-4
    torch.manual_seed(0)
    assert MAE(backbone=create_backbone("mae_nano")).inpainting_steps(hidden) == 0


def test_compare_needs_the_same_token_grid(image_diffmae_ckpt, tmp_path):
    coarse = diffmae_checkpoint(tmp_path / "coarse.ckpt", {**IMAGE_BACKBONE, "patch_size": 4}, tube=False)[0]
    with pytest.raises(ValueError, match=r"--compare_ckpt needs the same input and token grid .* as a \(4, 4\) grid "
                                         r"of 1x2x2-px tokens, .*coarse.ckpt takes \(8, 8\) as a \(2, 2\) grid of 1x4x4-px"):
        main(["inpaint", "--ckpt", str(image_diffmae_ckpt), "--compare_ckpt", str(coarse), "--image", "digits:0",
              "--out", str(tmp_path / "x.png")])


def test_compare_two_video_checkpoints(video_ckpt, tmp_path):
    other = diffmae_checkpoint(tmp_path / "other.ckpt", {**VIDEO_BACKBONE, "decoder": "joint", "top_down": False}, tube=True)[0]
    out = tmp_path / "both.gif"
    main(["inpaint", "--ckpt", str(video_ckpt), "--compare_ckpt", str(other), "--video", "moving_digits:1",
          "--samples", "1", "--steps", "2", "--out", str(out)])
    strip = Image.open(tmp_path / "both_strip.png")
    assert strip.size[1] == 4 * TILE + 1  # original, masked, one sample of each model
    gif = Image.open(out)
    assert gif.size[1] == 2 * TILE + 1 and gif.n_frames == 4


# ---------------------------------------------------------------------------------------------- first step
class RecordingDenoiser:
    """Stands in for a Denoiser: records the timesteps it is called at and predicts x̂0 = x / 2 + 1/4."""

    def __init__(self) -> None:
        self.schedule = NoiseSchedule("cosine", 50)
        self.calls = []

    def __call__(self, x, t, y=None):
        self.calls.append(t.clone())
        return DenoiserOutput(eps=x, x0=x / 2 + 0.25)


def test_first_step_sampler_predicts_x0_once_at_the_last_timestep_and_keeps_known_tokens():
    denoiser = RecordingDenoiser()
    out = FirstStepSampler().sample(denoiser, (2, 3, 4), generator=torch.Generator().manual_seed(0))
    noise = torch.randn((2, 3, 4), generator=torch.Generator().manual_seed(0))
    assert len(denoiser.calls) == 1 and denoiser.calls[0].tolist() == [49, 49]
    torch.testing.assert_close(out, noise / 2 + 0.25)
    known = torch.full((2, 3, 4), 7.0)
    mask = torch.tensor([[True, False, True], [False, False, True]])
    filled = FirstStepSampler().sample(RecordingDenoiser(), (2, 3, 4), generator=torch.Generator().manual_seed(0),
                                       known=known, mask=mask)
    assert (filled[~mask] == 7.0).all()
    torch.testing.assert_close(filled[mask], (noise / 2 + 0.25)[mask])
    with pytest.raises(ValueError, match="inpainting needs both known tokens and a mask"):
        FirstStepSampler().sample(denoiser, (2, 3, 4), known=known)


def test_video_command_with_the_first_step_sampler(video_ckpt, tmp_path, capsys):
    main(["inpaint", "--ckpt", str(video_ckpt), "--video", "moving_digits:2", "--sampler", "first_step", "--samples", "1",
          "--out", str(tmp_path / "first.gif")])
    assert "first step (x̂0 at t = T-1)" in capsys.readouterr().out
    assert Image.open(tmp_path / "first.gif").n_frames == 4
