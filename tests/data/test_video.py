import io
import os
import random
import tarfile

import av
import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

from maskdiff.tools.main import main
from maskdiff.data import (
    MovingDigitsDataModule,
    VideoDecoder,
    VideoShardsDataModule,
    encode_gray_mp4,
    expand_urls,
    read_manifest,
    render_moving_digits,
    write_manifest,
    write_moving_digits_shards,
    write_shards,
)
from maskdiff.data.moving_digits import mp4_codec
from maskdiff.data.video import ShortClipError

LOSSLESS = mp4_codec() == "libx264"


def to_uint8(clip: torch.Tensor) -> np.ndarray:
    """``(C, F, S, S)`` in [-1, 1] -> ``(F, S, S, C)`` uint8."""
    return ((clip + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 3, 0).numpy()


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def frame_sample(key: str, frames: np.ndarray, label: int | None = 0) -> dict:
    """A frame-sequence sample (``000.png, 001.png, ...``) of ``frames (T, H, W[, 3])`` uint8."""
    sample = {"__key__": key, **{f"{t:03d}.png": png(frame) for t, frame in enumerate(frames)}}
    if label is not None:
        sample["cls"] = label
    return sample


def write_split(root, name: str, samples: list[dict]) -> str:
    """Write ``samples`` as one shard with a manifest; returns its path."""
    shards = write_shards(samples, str(root / f"{name}-%06d.tar"), 100, progress=False)
    manifest = {"splits": {name: {"pattern": os.path.basename(shards[0]["path"]), "samples": len(samples),
                                  "shards": [{"path": os.path.basename(shards[0]["path"]), "samples": len(samples)}]}}}
    write_manifest(root / "manifest.json", manifest)
    return shards[0]["path"]


def eval_clips(datamodule) -> tuple[torch.Tensor, torch.Tensor]:
    batches = list(datamodule.val_dataloader())
    return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])


def center_of_mass(frame: np.ndarray) -> np.ndarray:
    ys, xs = np.indices(frame.shape)
    total = frame.sum(dtype=np.float64)
    return np.array([(xs * frame).sum() / total, (ys * frame).sum() / total])


@pytest.fixture(scope="module")
def moving_mp4(tmp_path_factory):
    root = tmp_path_factory.mktemp("moving-mp4")
    return root, write_moving_digits_shards(root, num_train=6, num_val=4, num_frames=20, samples_per_shard=4)


# ------------------------------------------------------------------------------------------ moving digits
def test_moving_digits_move_bounce_and_stay_on_the_canvas():
    labels = load_digits().target
    for index in range(8):
        frames, info = render_moving_digits(index, "train", num_frames=48, canvas=32, glyph_size=16, seed=0)
        assert frames.shape == (48, 32, 32) and frames.dtype == np.uint8
        assert info["labels"][0] == labels[info["digits"][0]]
        sums = frames.sum(axis=(1, 2), dtype=np.int64)
        assert (sums == sums[0]).all() and sums[0] > 0  # the whole glyph is on the canvas in every frame
        centres = np.stack([center_of_mass(f) for f in frames])
        steps = np.linalg.norm(np.diff(centres, axis=0), axis=1)
        assert (steps > 0.5).mean() > 0.9  # it moves (1.5 to 3 px per frame)
        assert steps.max() < 3.0 + 1.5  # constant speed: no jumps beyond speed + rounding
        directions = np.sign(np.diff(centres, axis=0))
        assert (directions[1:] * directions[:-1] < 0).any()  # a 16-px range at >= 1.5 px/frame bounces in 48 frames


def test_two_digit_videos_and_split_pools():
    frames, info = render_moving_digits(3, "val", num_frames=16, digits_per_video=2, seed=1)
    assert len(info["digits"]) == 2 and frames.max() > 0
    again, _ = render_moving_digits(3, "val", num_frames=16, digits_per_video=2, seed=1)
    np.testing.assert_array_equal(frames, again)
    train_digits = {d for i in range(40) for d in render_moving_digits(i, "train", num_frames=2, seed=1)[1]["digits"]}
    val_digits = {d for i in range(40) for d in render_moving_digits(i, "val", num_frames=2, seed=1)[1]["digits"]}
    assert not train_digits & val_digits


def test_mp4_round_trip_is_close_to_the_written_frames():
    frames, _ = render_moving_digits(0, num_frames=16, digits_per_video=2)
    with av.open(io.BytesIO(encode_gray_mp4(frames, fps=8))) as container:
        stream = container.streams.video[0]
        assert stream.frames == 16 and float(stream.average_rate) == 8
        decoded = np.stack([f.to_ndarray(format="gray") for f in container.decode(stream)])
    error = np.abs(decoded.astype(int) - frames).mean()
    assert decoded.shape == frames.shape
    assert error == 0 if LOSSLESS else error < 1
    with av.open(io.BytesIO(encode_gray_mp4(frames, fps=8, codec="mpeg4"))) as container:
        fallback = np.stack([f.to_ndarray(format="gray") for f in container.decode(video=0)])
    assert fallback.shape == frames.shape and np.abs(fallback.astype(int) - frames).mean() < 1


def test_writer_is_deterministic_and_lays_out_shards(tmp_path):
    first = write_moving_digits_shards(tmp_path / "a", num_train=5, num_val=2, num_frames=8, samples_per_shard=2)
    second = write_moving_digits_shards(tmp_path / "b", num_train=5, num_val=2, num_frames=8, samples_per_shard=2)
    assert first == second
    assert first["splits"]["train"]["pattern"] == "moving-digits-train-{000000..000002}.tar"
    assert [s["samples"] for s in first["splits"]["train"]["shards"]] == [2, 2, 1]
    assert (first["num_frames"], first["image_size"], first["channels"], first["classes"]) == (8, 32, 1, list(range(10)))
    for name in sorted(os.listdir(tmp_path / "a")):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    write_moving_digits_shards(tmp_path / "c", num_train=5, num_val=2, num_frames=8, samples_per_shard=2, seed=1)
    shard = "moving-digits-train-000000.tar"
    assert (tmp_path / "a" / shard).read_bytes() != (tmp_path / "c" / shard).read_bytes()
    with tarfile.open(tmp_path / "a" / shard) as tar:
        assert tar.getnames()[:3] == ["000000.cls", "000000.json", "000000.mp4"]


def test_bad_options_name_the_value(tmp_path):
    with pytest.raises(ValueError, match="num_frames must be a positive integer, got 0"):
        write_moving_digits_shards(tmp_path, num_frames=0)
    with pytest.raises(ValueError, match="format must be one of"):
        write_moving_digits_shards(tmp_path, format="gif")
    with pytest.raises(ValueError, match="glyph_size 40 does not fit"):
        render_moving_digits(0, glyph_size=40)
    with pytest.raises(ValueError, match="short_clips must be one of .*'loop'"):
        VideoDecoder(16, 1, 32, 1, 10, short_clips="loop")
    with pytest.raises(ValueError, match="num_frames must be a positive integer, got 0"):
        VideoShardsDataModule("x.tar", num_frames=0)
    with pytest.raises(ValueError, match="train_crop must be one of"):
        VideoShardsDataModule("x.tar", train_crop="zoom")


# ------------------------------------------------------------------------------------------ decoding & DataModule
def test_video_datamodule_train_and_centred_eval(moving_mp4):
    root, manifest = moving_mp4
    train, val = (str(root / manifest["splits"][split]["pattern"]) for split in ("train", "val"))
    datamodule = VideoShardsDataModule(
        train, val, num_frames=16, frame_stride=1, image_size=32, channels=1, num_classes=10,
        train_crop="random_resized", batch_size=3, num_workers=0, shuffle_buffer=4, seed=1,
    )
    datamodule.setup("fit")
    assert (datamodule.num_frames, datamodule.image_size, datamodule.channels, datamodule.num_classes) == (16, 32, 1, 10)
    clips, labels = next(iter(datamodule.train_dataloader()))
    assert clips.shape == (3, 1, 16, 32, 32) and clips.dtype == torch.float32 and labels.dtype == torch.int64
    assert clips.min() >= -1 and clips.max() <= 1
    clips, labels = eval_clips(datamodule)
    again, _ = eval_clips(datamodule)
    assert clips.shape == (4, 1, 16, 32, 32) and torch.equal(clips, again)
    for row in range(4):
        frames, info = render_moving_digits(row, "val", num_frames=20)
        assert labels[row] == info["labels"][0]
        expected = frames[2:18]  # centred: (20 - 16) // 2
        error = np.abs(to_uint8(clips[row])[..., 0].astype(int) - expected).mean()
        assert error == 0 if LOSSLESS else error < 1


def test_random_crop_and_flip_are_the_same_for_every_frame():
    rng = np.random.default_rng(0)
    still = rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)
    sample = frame_sample("still", np.stack([still] * 6), label=2)
    for crop in ("random_resized", "random"):
        decoder = VideoDecoder(4, 1, 24, 3, 10, train_crop=crop, hflip=True)
        outputs = []
        for seed in range(6):
            clip, label = decoder(sample, random.Random(seed))
            assert clip.shape == (3, 4, 24, 24) and label == 2
            assert all(torch.equal(clip[:, 0], clip[:, t]) for t in range(4))
            outputs.append(clip[:, 0])
        assert len({o.sum().item() for o in outputs}) > 1  # the crops do vary with the rng
    flips = VideoDecoder(4, 1, 40, 3, 10, train_crop="center", hflip=True)
    centred = flips(sample, None)[0]
    seen = {torch.equal(flips(sample, random.Random(s))[0], centred.flip(-1)) for s in range(10)}
    assert seen == {True, False}  # flipped or not, whole clips at once
    resized = to_uint8(VideoDecoder(4, 1, 40, 3, 10)(sample, None)[0])[0]
    np.testing.assert_array_equal(resized, still[:, 8:48])  # eval: shorter side already 40, centre crop


def test_temporal_offsets_random_in_training_centred_in_evaluation():
    frames = np.stack([np.full((8, 8), 10 * t, dtype=np.uint8) for t in range(12)])
    sample = frame_sample("ramp", frames)
    decoder = VideoDecoder(4, 2, 8, 1, 10, train_crop="center")

    def firsts(clip):
        return [int(v) for v in to_uint8(clip)[:, 0, 0, 0]]

    assert firsts(decoder(sample, None)[0]) == [20, 40, 60, 80]  # span 7 of 12 frames: start (12 - 7) // 2 = 2
    starts = {firsts(decoder(sample, random.Random(seed))[0])[0] for seed in range(30)}
    assert starts == {0, 10, 20, 30, 40, 50}


def test_short_clips_pad_or_skip(tmp_path):
    frames = np.stack([np.full((8, 8), 30 * t, dtype=np.uint8) for t in range(5)])
    sample = frame_sample("short", frames)
    padded = to_uint8(VideoDecoder(8, 1, 8, 1, 10, short_clips="pad")(sample, None)[0])[:, 0, 0, 0]
    assert padded.tolist() == [0, 30, 60, 90, 120, 120, 120, 120]
    with pytest.raises(ShortClipError, match="5 frames, a clip of 8 frames at stride 1 needs 8"):
        VideoDecoder(8, 1, 8, 1, 10, short_clips="skip")(sample, None)
    long_enough = frame_sample("long", np.stack([frames[0]] * 8))
    path = write_split(tmp_path, "val", [sample, long_enough])
    datamodule = VideoShardsDataModule(path, path, num_frames=8, frame_stride=1, image_size=8, channels=1,
                                       num_classes=10, short_clips="skip", batch_size=2, num_workers=0)
    clips, _ = eval_clips(datamodule)
    assert clips.shape[0] == 1 and datamodule.skipped == 1
    assert any("ShortClipError" in reason for reason in datamodule.skip_reasons)


def test_undecodable_mp4_is_skipped_and_counted(tmp_path):
    good, _ = render_moving_digits(0, num_frames=8)
    samples = [
        {"__key__": "good", "mp4": encode_gray_mp4(good), "cls": 1},
        {"__key__": "broken", "mp4": b"\x00\x00\x00\x18ftypmp42 not really a video", "cls": 2},
        {"__key__": "truncated", "mp4": encode_gray_mp4(good)[:200], "cls": 3},
    ]
    path = write_split(tmp_path, "val", samples)
    datamodule = VideoShardsDataModule(path, path, num_frames=8, frame_stride=1, image_size=32, channels=1,
                                       num_classes=10, batch_size=3, num_workers=0)
    clips, labels = eval_clips(datamodule)
    assert labels.tolist() == [1] and clips.shape == (1, 1, 8, 32, 32)
    assert datamodule.skipped == 2


def test_unlabelled_videos_get_minus_one_or_are_skipped(tmp_path):
    frames = np.zeros((4, 8, 8), dtype=np.uint8)
    path = write_split(tmp_path, "val", [frame_sample("a", frames, label=None), frame_sample("b", frames, label=4)])
    options = {"num_frames": 4, "frame_stride": 1, "image_size": 8, "channels": 1, "num_classes": 10, "batch_size": 2,
               "num_workers": 0}
    unlabelled = VideoShardsDataModule(path, path, labelled=False, **options)
    assert eval_clips(unlabelled)[1].tolist() == [-1, 4]
    labelled = VideoShardsDataModule(path, path, labelled=True, **options)
    assert eval_clips(labelled)[1].tolist() == [4] and labelled.skipped == 1


def test_frame_shards_match_mp4_shards(tmp_path):
    options = {"num_train": 2, "num_val": 3, "num_frames": 16, "samples_per_shard": 10}
    write_moving_digits_shards(tmp_path / "mp4", format="mp4", **options)
    frames_manifest = write_moving_digits_shards(tmp_path / "frames", format="frames", **options)
    with tarfile.open(tmp_path / "frames" / "moving-digits-val-000000.tar") as tar:
        assert "000000.015.png" in tar.getnames() and "000000.json" in tar.getnames()
    assert frames_manifest["codec"] == "png"
    loaded = []
    for name in ("mp4", "frames"):
        pattern = str(tmp_path / name / "moving-digits-val-000000.tar")
        datamodule = VideoShardsDataModule(pattern, pattern, num_frames=16, frame_stride=1, image_size=32, channels=1,
                                           num_classes=10, batch_size=3, num_workers=0)
        loaded.append(eval_clips(datamodule))
    assert torch.equal(loaded[0][1], loaded[1][1])
    difference = (loaded[0][0] - loaded[1][0]).abs().mean()
    assert difference == 0 if LOSSLESS else difference < 0.01


def test_moving_digits_datamodule_writes_its_cache_once(tmp_path):
    options = {"cache_dir": str(tmp_path), "num_frames": 8, "num_train": 4, "num_val": 2, "batch_size": 2}
    datamodule = MovingDigitsDataModule(**options)
    datamodule.prepare_data()
    datamodule.setup("fit")
    clips, labels = next(iter(datamodule.train_dataloader()))
    assert clips.shape == (2, 1, 8, 32, 32) and set(labels.tolist()) <= set(range(10))
    assert datamodule.train_steps() == 2
    (variant,) = os.listdir(tmp_path / "moving-digits")
    stamps = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "moving-digits" / variant).iterdir()}
    again = MovingDigitsDataModule(**options)
    assert eval_clips(again)[0].shape == (2, 1, 8, 32, 32)
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "moving-digits" / variant).iterdir()} == stamps


# ------------------------------------------------------------------------------------------ CLI writers
def test_shards_moving_digits_cli(tmp_path, capsys):
    out = tmp_path / "md"
    main(["shards", "moving-digits", str(out), "--num_train", "3", "--num_val", "2", "--num_frames", "6",
          "--canvas", "24", "--glyph_size", "12", "--format", "frames", "--seed", "2"])
    manifest = read_manifest(out / "manifest.json")
    assert (manifest["num_frames"], manifest["image_size"], manifest["video_format"]) == (6, 24, "frames")
    assert manifest["splits"]["val"]["samples"] == 2
    assert "wrote" in capsys.readouterr().out


def rgb_mp4(path, frames: int, size=(24, 40)) -> None:
    """An RGB H.264/MPEG-4 file of ``frames`` frames (a moving gradient) at 10 fps."""
    codec = "libx264" if LOSSLESS else "mpeg4"
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=10)
        stream.height, stream.width = size
        stream.pix_fmt = "yuv420p"
        for t in range(frames):
            pixels = np.zeros((*size, 3), dtype=np.uint8)
            pixels[..., 0] = (np.arange(size[1]) * 6 + 10 * t) % 256
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(stream.encode())


def test_shards_videos_cli_from_class_folders_and_a_list(tmp_path, capsys):
    src = tmp_path / "videos"
    for name, count in (("abseiling", 2), ("zumba", 1)):
        (src / name).mkdir(parents=True)
        for i in range(count):
            rgb_mp4(src / name / f"clip{i}.mp4", frames=12)
    (src / "zumba" / "broken.mp4").write_bytes(b"not a video at all")
    out = tmp_path / "shards"
    main(["shards", "videos", str(src), str(out), "--split", "train", "--samples_per_shard", "2", "--prefix", "k"])
    manifest = read_manifest(out / "manifest.json")
    split = manifest["splits"]["train"]
    assert manifest["classes"] == ["abseiling", "zumba"]
    assert split["samples"] == 3 and split["pattern"] == "k-train-{000000..000001}.tar"
    assert [os.path.basename(s["path"]) for s in split["skipped"]] == ["broken.mp4"]
    assert "skipped" in capsys.readouterr().out
    urls = expand_urls(str(out / split["pattern"]))
    with tarfile.open(urls[0]) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    assert members["0000000.mp4"] == (src / "abseiling" / "clip0.mp4").read_bytes()  # original bytes
    assert members["0000000.cls"] == b"0"
    assert b'"frames": 12' in members["0000000.json"] and b'"fps": 10.0' in members["0000000.json"]

    pattern = str(out / split["pattern"])
    datamodule = VideoShardsDataModule(pattern, pattern, num_frames=8, frame_stride=1, image_size=16, channels=3,
                                       num_classes=2, batch_size=2, num_workers=0)
    clips, labels = eval_clips(datamodule)
    assert clips.shape == (3, 3, 8, 16, 16) and labels.tolist() == [0, 0, 1]
    red = clips[0, 0, :, 8, 8]
    assert (red.diff() > 0).all()  # the gradient moves frame to frame: frames come in order

    listing = tmp_path / "val.txt"
    listing.write_text("# path label\nvideos/zumba/clip0.mp4 1\nvideos/abseiling/clip1.mp4\n")
    main(["shards", "videos", str(listing), str(out), "--split", "val", "--prefix", "k"])
    manifest = read_manifest(out / "manifest.json")
    assert set(manifest["splits"]) == {"train", "val"} and manifest["total"] == 5
    pattern = str(out / "k-val-000000.tar")
    unlabelled = VideoShardsDataModule(pattern, pattern, num_frames=8, frame_stride=1, image_size=16, num_classes=2,
                                       labelled=False, batch_size=2, num_workers=0)
    assert eval_clips(unlabelled)[1].tolist() == [1, -1]
