import io
import json
import logging
import os
import random
import re
import subprocess
import sys
import tarfile
import time

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image, UnidentifiedImageError
from sklearn.datasets import load_digits
from torchvision import transforms

from maskdiff.data import (
    DataFault,
    DigitsDataModule,
    ImageDecoder,
    ImageShardsDataModule,
    SkipCounter,
    check_local_shards,
    ensure_digits_shards,
    eval_batch_plan,
    expand_urls,
    lookup_shard_counts,
    write_manifest,
    write_shards,
)
from maskdiff.data import transforms as transforms_module
from maskdiff.data.transforms import Box, decode_pixels, random_resized_crop_box
from tests.helpers import ROOT


def png_bytes(value, size=8, mode="L"):
    array = np.full((size, size) if mode == "L" else (size, size, 3), value, dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buffer, format="PNG")
    return buffer.getvalue()


def write_synthetic(folder, num_samples, per_shard, corrupt=(), manifest=True):
    """Shards of 8×8 gray images whose label is the sample index (a unique id); returns the pattern."""
    samples = [
        {"__key__": f"s{i:04d}", "png": b"not a png" if i in corrupt else png_bytes(i), "cls": i}
        for i in range(num_samples)
    ]
    shards = write_shards(samples, str(folder / "syn-%06d.tar"), per_shard, progress=False)
    if manifest:
        entries = [{"path": os.path.basename(s["path"]), "samples": s["samples"]} for s in shards]
        write_manifest(folder / "manifest.json", {"shards": entries, "total": num_samples})
    return str(folder / f"syn-{{000000..{len(shards) - 1:06d}}}.tar")


def synthetic_module(pattern, **kwargs):
    defaults = dict(
        train_shards=pattern, val_shards=pattern, image_size=8, channels=1, num_classes=1000,
        num_workers=0, shuffle_buffer=0,
    )
    return ImageShardsDataModule(**(defaults | kwargs))


def with_rank(monkeypatch, module, rank, world_size):
    monkeypatch.setattr(module, "_distributed_info", lambda: (rank, world_size))
    return module


@pytest.fixture(scope="module")
def digits_dir(digits_cache):
    return str(digits_cache)


# shard helpers


def test_write_shards_reports_shards_and_is_reproducible(tmp_path):
    samples = [{"__key__": f"k{i}", "png": png_bytes(i), "cls": i} for i in range(5)]
    info = write_shards(samples, str(tmp_path / "a-%06d.tar"), max_samples=2, progress=False)
    assert [(os.path.basename(s["path"]), s["samples"]) for s in info] == [
        ("a-000000.tar", 2), ("a-000001.tar", 2), ("a-000002.tar", 1)
    ]
    with tarfile.open(info[0]["path"]) as tar:
        members = [(m.name, m.mtime) for m in tar.getmembers()]
    assert members == [("k0.cls", 0), ("k0.png", 0), ("k1.cls", 0), ("k1.png", 0)]
    again = write_shards(samples, str(tmp_path / "b-%06d.tar"), max_samples=2, progress=False)
    for first, second in zip(info, again):
        assert open(first["path"], "rb").read() == open(second["path"], "rb").read()
    assert write_shards([], str(tmp_path / "empty-%06d.tar"), 2, progress=False) == []
    assert not list(tmp_path.glob("empty-*"))
    with pytest.raises(ValueError, match="__key__"):
        write_shards([{"__key__": "a.b", "cls": 1}], str(tmp_path / "c-%06d.tar"), 2, progress=False)


def test_expand_and_check_urls(tmp_path):
    assert expand_urls("x-{000..002}.tar::y.tar") == ["x-000.tar", "x-001.tar", "x-002.tar", "y.tar"]
    with pytest.raises(ValueError, match="no shards"):
        expand_urls("")
    (tmp_path / "x-0.tar").write_bytes(b"")
    pattern = str(tmp_path / "x-{0..1}.tar")
    with pytest.raises(FileNotFoundError) as error:
        check_local_shards(expand_urls(pattern), pattern)
    assert str(tmp_path / "x-1.tar") in str(error.value) and pattern in str(error.value)
    check_local_shards(["pipe:cat /nowhere.tar", "https://host/a.tar", "s3://b/a.tar", "gs://b/a.tar"])
    assert lookup_shard_counts(["https://host/a.tar"]) is None
    assert lookup_shard_counts([str(tmp_path / "x-0.tar")]) is None


def test_skip_counter_counts_reasons_without_sleeping(caplog):
    counter = SkipCounter(max_errors=3, log_first=2)
    start = time.perf_counter()
    with caplog.at_level(logging.WARNING, logger="maskdiff.data"):
        assert counter(ValueError("sample 'k7': bad png"), "k7") is True
        assert counter(ValueError("sample 'k9': bad png"), "k9") is True
        assert counter(KeyError("no cls"), "k12") is True
    assert time.perf_counter() - start < 0.1
    assert counter.skipped == 3
    assert counter.reasons == {"ValueError: sample: bad png": 2, "KeyError: no cls": 1}
    assert counter.examples == {"ValueError: sample: bad png": ["k7", "k9"], "KeyError: no cls": ["k12"]}
    assert len(caplog.records) == 2 and "(k7)" in caplog.records[0].getMessage()
    with pytest.raises(DataFault, match=r"^data: more than max_errors=3 samples .*the last: OSError: truncated \(k3\)$"):
        counter(OSError("truncated"), "k3")


def test_eval_batch_plan_is_balanced_and_exact():
    cases = [(300, 1, 64), (301, 2, 50), (7, 2, 2), (5, 4, 2), (10, 3, 4), (6, 3, 1)]
    for num_samples, world_size, batch_size in cases:
        plans = [eval_batch_plan(num_samples, world_size, rank, batch_size) for rank in range(world_size)]
        assert len({len(plan) for plan in plans}) == 1
        covered = [i for plan in plans for start, stop in plan for i in range(start, stop)]
        assert covered == list(range(num_samples))
        assert all(0 < stop - start <= batch_size for plan in plans for start, stop in plan)
    assert eval_batch_plan(301, 2, 0, 50) == [(0, 50), (50, 100), (100, 149), (149, 150)]
    assert eval_batch_plan(301, 2, 1, 50) == [(150, 200), (200, 250), (250, 300), (300, 301)]
    with pytest.raises(ValueError, match="val_samples=3"):
        eval_batch_plan(3, 2, 0, 1)


# DataModule


def test_digits_train_batches(digits_dir):
    module = DigitsDataModule(cache_dir=digits_dir, batch_size=32)
    assert (module.image_size, module.channels, module.num_classes) == (16, 1, 10)
    module.setup("fit")
    loader = module.train_dataloader()
    assert len(loader) == 1497 // 32
    batches = list(loader)
    assert len(batches) == 1497 // 32
    images, labels = batches[0]
    assert images.shape == (32, 1, 16, 16) and images.dtype == torch.float32
    assert labels.shape == (32,) and labels.dtype == torch.int64
    all_images = torch.cat([b[0] for b in batches])
    all_labels = torch.cat([b[1] for b in batches])
    assert all_images.min() >= -1 and all_images.max() <= 1
    assert all_images.min() == -1 and all_images.max() == 1
    assert set(all_labels.tolist()) == set(range(10))
    assert module.epochs_seen == 1 and module.skipped == 0


def test_train_steps_follow_world_size_and_samples(digits_dir, monkeypatch):
    module = with_rank(monkeypatch, DigitsDataModule(cache_dir=digits_dir, batch_size=32), 1, 2)
    module.setup("fit")
    assert len(module.train_dataloader()) == 1497 // 64
    small = DigitsDataModule(cache_dir=digits_dir, batch_size=32, train_samples_per_epoch=10)
    assert len(small.train_dataloader()) == 1


def test_train_stream_is_seeded_and_changes_per_epoch(digits_dir):
    def first_batches(seed):
        module = DigitsDataModule(
            cache_dir=digits_dir, batch_size=8, train_samples_per_epoch=8, seed=seed, shuffle_buffer=50
        )
        loader = module.train_dataloader()
        return [next(iter(loader)) for _ in range(2)], module

    (epoch1, epoch2), module = first_batches(0)
    (again1, _), _ = first_batches(0)
    (other1, _), _ = first_batches(1)
    assert torch.equal(epoch1[0], again1[0]) and torch.equal(epoch1[1], again1[1])
    assert not torch.equal(epoch1[0], epoch2[0])
    assert not torch.equal(epoch1[0], other1[0])
    assert module.state_dict() == {"seed": 0, "epochs_seen": 2}
    restored = DigitsDataModule(cache_dir=digits_dir, batch_size=8, train_samples_per_epoch=8, seed=5)
    restored.load_state_dict(module.state_dict())
    assert (restored.seed, restored.epochs_seen) == (0, 2)
    resumed = next(iter(restored.train_dataloader()))
    assert restored.epochs_seen == 3 and not torch.equal(resumed[0], epoch2[0])


def expected_val_rows(digits_dir):
    """Sorted (label, 64 pixels in [-1, 1]) rows of the digits val split."""
    manifest = ensure_digits_shards(digits_dir)
    images, targets = load_digits(return_X_y=True)
    rows = []
    for url in expand_urls(os.path.join(manifest["root"], manifest["splits"]["val"]["pattern"])):
        with tarfile.open(url) as tar:
            keys = sorted({m.name.split(".")[0] for m in tar.getmembers()})
        for key in keys:
            pixels = [round(v * 255 / 16) / 127.5 - 1 for v in images[int(key)]]
            rows.append((int(targets[int(key)]), *pixels))
    return sorted(rows)


def loader_rows(loader):
    rows = []
    for images, labels in loader:
        for image, label in zip(images.reshape(len(images), -1).tolist(), labels.tolist()):
            rows.append((label, *image))
    return rows


def approx_equal_rows(got, expected):
    assert len(got) == len(expected)
    np.testing.assert_allclose(np.array(sorted(got)), np.array(expected), atol=1e-6)


def test_digits_validation_reads_each_sample_once(digits_dir, monkeypatch):
    expected = expected_val_rows(digits_dir)
    module = DigitsDataModule(cache_dir=digits_dir, image_size=8, val_batch_size=64)
    module.setup("validate")
    loader = module.val_dataloader()
    assert len(loader) == 5
    batches = list(loader)
    assert [len(b[1]) for b in batches] == [64, 64, 64, 64, 44]
    approx_equal_rows(loader_rows(batches), expected)

    ranks = [
        with_rank(monkeypatch, DigitsDataModule(cache_dir=digits_dir, image_size=8, val_batch_size=64), rank, 2)
        for rank in range(2)
    ]
    per_rank = [list(m.val_dataloader()) for m in ranks]
    assert [len(b) for b in per_rank] == [3, 3] == [len(m.val_dataloader()) for m in ranks]
    approx_equal_rows(loader_rows(per_rank[0]) + loader_rows(per_rank[1]), expected)
    assert module.test_dataloader() is not None and len(module.predict_dataloader()) == 5


@pytest.mark.parametrize(
    "num_samples, per_shard, world_size, batch_size, manifest",
    [(7, 7, 2, 2, True), (7, 3, 3, 2, True), (10, 3, 2, 3, False), (11, 2, 4, 2, True)],
)
def test_validation_ranks_get_equal_batches_and_every_sample_once(
    tmp_path, monkeypatch, num_samples, per_shard, world_size, batch_size, manifest
):
    pattern = write_synthetic(tmp_path, num_samples, per_shard, manifest=manifest)
    labels, batch_counts = [], []
    for rank in range(world_size):
        module = synthetic_module(pattern, val_batch_size=batch_size, val_samples=None if manifest else num_samples)
        with_rank(monkeypatch, module, rank, world_size).setup("validate")
        batches = list(module.val_dataloader())
        assert all(len(b[1]) >= 1 for b in batches)
        batch_counts.append(len(batches))
        labels += [label for _, batch_labels in batches for label in batch_labels.tolist()]
    assert len(set(batch_counts)) == 1
    assert sorted(labels) == list(range(num_samples))


def test_validation_with_worker_processes(tmp_path):
    pattern = write_synthetic(tmp_path, 9, 4, corrupt={2})
    module = synthetic_module(pattern, val_batch_size=2, num_workers=2)
    module.setup("validate")
    batches = list(module.val_dataloader())
    assert len(batches) == 5
    assert sorted(label for _, b in batches for label in b.tolist()) == [0, 1, 3, 4, 5, 6, 7, 8]
    assert module.skipped == 1


def test_missing_shard_names_the_path(tmp_path):
    pattern = write_synthetic(tmp_path, 4, 2)
    missing_pattern = pattern.replace("000001}", "000002}")
    module = synthetic_module(missing_pattern)
    with pytest.raises(FileNotFoundError, match="syn-000002.tar"):
        module.setup("fit")


def test_counts_required_without_manifest(tmp_path):
    pattern = write_synthetic(tmp_path, 4, 2, manifest=False)
    with pytest.raises(ValueError, match="train_samples_per_epoch"):
        synthetic_module(pattern, val_shards=None).setup("fit")
    with pytest.raises(ValueError, match="val_samples"):
        synthetic_module(pattern, train_samples_per_epoch=4).setup("fit")


@pytest.mark.parametrize("name, value", [("image_size", 0), ("channels", 2), ("batch_size", -1)])
def test_invalid_config_names_the_value(name, value):
    with pytest.raises(ValueError, match=name):
        ImageShardsDataModule(train_shards="x.tar", **{name: value})


def test_corrupt_sample_is_skipped_and_counted(tmp_path):
    pattern = write_synthetic(tmp_path, 5, 5, corrupt={2})
    module = synthetic_module(pattern, val_batch_size=8)
    module.setup("validate")
    (images, labels), = list(module.val_dataloader())
    assert labels.tolist() == [0, 1, 3, 4] and images.shape == (4, 1, 8, 8)
    assert module.skipped == 1
    assert any(reason.startswith("UnidentifiedImageError") for reason in module.skip_reasons)

    trainer_side = synthetic_module(pattern, batch_size=4, train_samples_per_epoch=4)
    (images, labels), = list(trainer_side.train_dataloader())
    assert labels.tolist() == [0, 1, 3, 4]
    assert torch.allclose(images[:, 0, 0, 0], torch.tensor([0, 1, 3, 4]) / 127.5 - 1)
    assert trainer_side.skipped == 1

    strict = synthetic_module(pattern, val_batch_size=8, max_errors=0)
    with pytest.raises(Exception, match="cannot identify image"):
        list(strict.val_dataloader())


def test_rgb_non_square_images_are_cropped_and_resized(tmp_path):
    array = np.zeros((6, 10, 3), dtype=np.uint8)
    array[:, 2:8] = 255
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    sample = {"__key__": "wide", "png": buffer.getvalue(), "cls": 1}
    write_shards([sample], str(tmp_path / "rgb-%06d.tar"), 1, progress=False)
    module = ImageShardsDataModule(
        train_shards=str(tmp_path / "rgb-000000.tar"), val_shards=str(tmp_path / "rgb-000000.tar"),
        image_size=4, channels=3, num_classes=2, val_samples=1, num_workers=0,
    )
    (images, labels), = list(module.val_dataloader())
    assert images.shape == (1, 3, 4, 4) and labels.tolist() == [1]
    assert torch.allclose(images, torch.ones_like(images))


class _TinyClassifier(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(64, 10)

    def training_step(self, batch, batch_idx):
        images, labels = batch
        return torch.nn.functional.cross_entropy(self.layer(images.flatten(1)), labels)

    def validation_step(self, batch, batch_idx):
        images, labels = batch
        self.log("val_loss", torch.nn.functional.cross_entropy(self.layer(images.flatten(1)), labels))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lightning_fit_uses_lengths_and_checkpoints_state(digits_dir, tmp_path):
    module = DigitsDataModule(
        cache_dir=digits_dir, image_size=8, batch_size=32, val_batch_size=100, train_samples_per_epoch=96
    )
    trainer = L.Trainer(
        max_epochs=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )
    trainer.fit(_TinyClassifier(), datamodule=module)
    assert trainer.global_step == 6
    assert trainer.num_val_batches == [3]
    assert module.epochs_seen == 2
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert checkpoint["DigitsDataModule"] == {"seed": 0, "epochs_seen": 2}


def test_hflip_flips_some_training_images(tmp_path):
    array = np.zeros((8, 8), dtype=np.uint8)
    array[:, :2] = 255
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    pattern = str(tmp_path / "left-000000.tar")
    sample = {"__key__": "left", "png": buffer.getvalue(), "cls": 0}
    write_shards([sample], str(tmp_path / "left-%06d.tar"), 1, progress=False)
    flipping = synthetic_module(pattern, val_shards=None, hflip=True, batch_size=32, train_samples_per_epoch=32)
    (images, _), = list(flipping.train_dataloader())
    bright_left = images[:, 0, 0, 0] > 0
    assert bright_left.any() and (~bright_left).any()
    assert torch.equal(images[~bright_left], images[bright_left][:1].flip(-1).expand_as(images[~bright_left]))
    plain = synthetic_module(pattern, val_shards=None, batch_size=32, train_samples_per_epoch=32)
    (images, _), = list(plain.train_dataloader())
    assert (images[:, 0, 0, 0] > 0).all()


def test_training_fails_loudly_when_nothing_decodes(tmp_path):
    pattern = write_synthetic(tmp_path, 1, 1, corrupt={0})
    module = synthetic_module(pattern, val_shards=None, batch_size=2, train_samples_per_epoch=2)
    with pytest.raises(DataFault, match="1001 samples in a row of train_shards .* failed to decode"):
        next(iter(module.train_dataloader()))
    assert module.skipped == 1000


# transforms: fast decoding and the DiT/MDT and MAE crops


def smooth_image(height, width, seed, mode="RGB"):
    """A deterministic natural-looking image: bicubically upsampled coarse noise plus fine grain."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC), dtype=np.int16)
    grain = rng.integers(-12, 13, (height, width, 3), dtype=np.int16)
    return Image.fromarray(np.clip(smooth + grain, 0, 255).astype(np.uint8)).convert(mode)


def encoded(image, fmt, **options):
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def center_crop_arr(pil_image, image_size):
    """guided-diffusion's ADM centre crop (image_datasets.py), verbatim."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return arr[crop_y : crop_y + image_size, crop_x : crop_x + image_size]


def hwc(pixels):
    return pixels.permute(1, 2, 0).numpy().astype(int)


@pytest.mark.parametrize("size, height, width", [(64, 300, 265), (64, 120, 90), (32, 20, 28)])
def test_adm_center_crop_matches_guided_diffusion(size, height, width):
    image = smooth_image(height, width, seed=size + height)
    decoder = ImageDecoder(size, 3, 10, crop="adm_center")
    got = hwc(decoder.pixels(encoded(image, "PNG")))
    expected = center_crop_arr(image, size).astype(int)
    assert got.shape == expected.shape == (size, size, 3)
    assert np.abs(got - expected).max() <= 2 and np.abs(got - expected).mean() < 0.3
    assert torch.equal(decoder.pixels(encoded(image, "PNG")), decoder.pixels(encoded(image, "PNG"), random.Random(0)))


def test_random_resized_crop_boxes_follow_mae_bounds_and_seed():
    boxes = [random_resized_crop_box(200, 300, (0.2, 1.0), (3 / 4, 4 / 3), random.Random(seed)) for seed in range(300)]
    for box in boxes:
        assert 0 <= box.top <= 200 - box.height and 0 <= box.left <= 300 - box.width
        assert 0.2 * 0.95 <= box.height * box.width / (200 * 300) <= 1.0
        assert 3 / 4 * 0.95 <= box.width / box.height <= 4 / 3 * 1.05
    areas = [box.height * box.width / 60000 for box in boxes]
    assert min(areas) < 0.3 and max(areas) > 0.8
    assert boxes[7] == random_resized_crop_box(200, 300, (0.2, 1.0), (3 / 4, 4 / 3), random.Random(7))
    fallback = random_resized_crop_box(10, 200, (0.9, 1.0), (3 / 4, 4 / 3), random.Random(0))
    assert fallback == Box(0, 93, 10, 13)


def test_random_resized_crop_matches_pil_and_is_reproducible():
    image = smooth_image(150, 200, seed=3)
    data = encoded(image, "PNG")
    decoder = ImageDecoder(48, 3, 10, crop="random_resized")
    got = decoder.pixels(data, random.Random(5))
    assert got.shape == (3, 48, 48) and got.dtype == torch.uint8
    box = random_resized_crop_box(150, 200, (0.2, 1.0), (3 / 4, 4 / 3), random.Random(5))
    reference = image.resize((48, 48), Image.Resampling.BICUBIC, box=(box.left, box.top, box.left + box.width, box.top + box.height))
    assert np.abs(hwc(got) - np.asarray(reference, dtype=int)).max() <= 2
    assert torch.equal(got, decoder.pixels(data, random.Random(5)))
    assert not torch.equal(got, decoder.pixels(data, random.Random(6)))


def test_mae_evaluation_transform_matches_torchvision_on_pil():
    image = smooth_image(150, 200, seed=4)
    decoder = ImageDecoder(56, 3, 10, crop="random_resized")
    assert decoder.eval_resize == 64
    reference = transforms.Compose(
        [transforms.Resize(64, interpolation=transforms.InterpolationMode.BICUBIC), transforms.CenterCrop(56)]
    )(image)
    assert np.abs(hwc(decoder.pixels(encoded(image, "PNG"))) - np.asarray(reference, dtype=int)).max() <= 1
    assert ImageDecoder(256, 3, 10, crop="random_resized").eval_resize == 292


def pil_pixels(data, channels):
    return hwc(transforms_module.TF.pil_to_tensor(Image.open(io.BytesIO(data)).convert("L" if channels == 1 else "RGB")))


@pytest.mark.parametrize(
    "fmt, mode, options, tolerance",
    [
        ("JPEG", "RGB", {"quality": 90}, 2),
        ("JPEG", "L", {"quality": 90}, 1),
        ("JPEG", "CMYK", {"quality": 95}, 2),
        ("PNG", "RGB", {}, 0),
        ("PNG", "L", {}, 0),
        ("PNG", "RGBA", {}, 0),
        ("PNG", "P", {}, 0),
        ("WEBP", "RGB", {"quality": 90}, 2),
        ("BMP", "RGB", {}, 0),
    ],
)
@pytest.mark.parametrize("channels", [1, 3])
def test_fast_decoding_matches_pil(fmt, mode, options, tolerance, channels):
    """Colour to grayscale may round differently (libjpeg/libpng vs PIL): one more grey level then."""
    data = encoded(smooth_image(40, 56, seed=5, mode=mode), fmt, **options)
    pixels = decode_pixels(data, channels)
    assert pixels.shape == (channels, 40, 56) and pixels.dtype == torch.uint8
    to_gray = channels == 1 and mode != "L"
    assert np.abs(hwc(pixels) - pil_pixels(data, channels)).max() <= tolerance + to_gray


def test_sixteen_bit_png_is_scaled_to_eight_bits():
    values = np.linspace(0, 65535, 48 * 32).reshape(32, 48).astype(np.uint16)
    pixels = decode_pixels(encoded(Image.fromarray(values), "PNG"), 1)
    assert pixels.dtype == torch.uint8
    assert np.abs(hwc(pixels)[..., 0] - values.astype(np.float64) / 257).max() <= 1


def test_pil_fallback_decodes_what_torchvision_cannot(monkeypatch):
    data = encoded(smooth_image(30, 40, seed=6), "JPEG", quality=90)
    fast = decode_pixels(data, 3)

    def refuse(*args, **kwargs):
        raise RuntimeError("unsupported by torchvision")

    monkeypatch.setattr(transforms_module, "decode_image", refuse)
    assert (decode_pixels(data, 3).int() - fast.int()).abs().max() <= 1
    with pytest.raises(UnidentifiedImageError):
        decode_pixels(b"not an image", 3)


def test_reduced_jpeg_decoding_stays_close_to_full_decoding():
    data = encoded(smooth_image(480, 640, seed=7), "JPEG", quality=92)
    assert decode_pixels(data, 3, transforms_module.open_header(data), reduce=4).shape == (3, 120, 160)
    for crop, rng_seed in [("random_resized", 1), ("adm_center", None), ("random_resized", None), ("center", None)]:
        rng = None if rng_seed is None else random.Random(rng_seed)
        reduced = ImageDecoder(56, 3, 10, crop=crop, scale=(0.9, 1.0)).pixels(data, rng)
        rng = None if rng_seed is None else random.Random(rng_seed)
        full = ImageDecoder(56, 3, 10, crop=crop, scale=(0.9, 1.0), jpeg_draft=False).pixels(data, rng)
        difference = (reduced.float() - full.float()).abs()
        assert difference.mean() < 2.0 and difference.max() <= 16, crop


def test_invalid_decoder_options_name_the_value():
    with pytest.raises(ValueError, match="crop must be one of"):
        ImageDecoder(8, 3, 10, crop="middle")
    with pytest.raises(ValueError, match="scale"):
        ImageDecoder(8, 3, 10, scale=(0.5, 0.2))
    with pytest.raises(ValueError, match="ratio"):
        ImageDecoder(8, 3, 10, ratio=(0, 1))
    with pytest.raises(ValueError, match="crop must be one of"):
        ImageShardsDataModule(train_shards="x.tar", crop="middle")


def test_training_batches_of_an_imagenet_like_module(tmp_path):
    samples = [
        {"__key__": f"{i:03d}", "jpg": encoded(smooth_image(60 + 7 * i, 80, seed=i), "JPEG", quality=90), "cls": i % 3}
        for i in range(6)
    ]
    write_shards(samples, str(tmp_path / "in-%06d.tar"), 3, progress=False)
    pattern = str(tmp_path / "in-{000000..000001}.tar")
    module = ImageShardsDataModule(
        train_shards=pattern, val_shards=pattern, image_size=32, channels=3, num_classes=3, batch_size=4,
        num_workers=0, crop="random_resized", hflip=True, train_samples_per_epoch=8, val_samples=6,
        val_batch_size=6, shuffle_buffer=4,
    )
    images, labels = next(iter(module.train_dataloader()))
    assert images.shape == (4, 3, 32, 32) and images.dtype == torch.float32
    assert -1 <= images.min() and images.max() <= 1 and set(labels.tolist()) <= {0, 1, 2}
    (val_images, val_labels), = list(module.val_dataloader())
    assert val_images.shape == (6, 3, 32, 32) and val_labels.tolist() == [0, 1, 2, 0, 1, 2]
    reference = ImageDecoder(32, 3, 3, crop="random_resized").pixels(samples[5]["jpg"])
    assert torch.allclose(val_images[5], reference.float() / 127.5 - 1)
    assert module.samples_read >= 4 + 6 and module.skipped == 0


class _DtypeRecorder(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(3 * 16 * 16, 3)
        self.seen = []

    def training_step(self, batch, batch_idx):
        images, labels = batch
        self.seen.append((images.dtype, float(images.min()), float(images.max())))
        return torch.nn.functional.cross_entropy(self.layer(images.flatten(1)), labels)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_uint8_training_batches_are_scaled_after_transfer(tmp_path):
    samples = [{"__key__": f"{i:03d}", "png": encoded(smooth_image(20, 24, seed=i), "PNG"), "cls": i % 3} for i in range(6)]
    write_shards(samples, str(tmp_path / "u8-%06d.tar"), 6, progress=False)
    options = dict(
        train_shards=str(tmp_path / "u8-000000.tar"), image_size=16, channels=3, num_classes=3, batch_size=4,
        num_workers=0, crop="random_resized", hflip=True, train_samples_per_epoch=8, shuffle_buffer=0,
    )
    as_uint8 = ImageShardsDataModule(**options, uint8_train_batches=True)
    as_float = ImageShardsDataModule(**options)
    (images, labels), (float_images, float_labels) = next(iter(as_uint8.train_dataloader())), next(iter(as_float.train_dataloader()))
    assert images.dtype == torch.uint8 and torch.equal(labels, float_labels)
    scaled, _ = as_uint8.on_after_batch_transfer((images, labels), 0)
    assert torch.equal(scaled, float_images)

    recorder = _DtypeRecorder()
    trainer = L.Trainer(
        max_steps=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )
    trainer.fit(recorder, datamodule=ImageShardsDataModule(**options, uint8_train_batches=True))
    assert [dtype for dtype, _, _ in recorder.seen] == [torch.float32, torch.float32]
    assert all(-1 <= low and high <= 1 for _, low, high in recorder.seen)


# unlabelled shards, skip accounting, preflight


def test_unlabelled_shards_get_label_minus_one(tmp_path):
    samples = [{"__key__": f"u{i}", "png": png_bytes(10 * i)} for i in range(4)]
    write_shards(samples, str(tmp_path / "u-%06d.tar"), 4, progress=False)
    pattern = str(tmp_path / "u-000000.tar")
    unlabelled = synthetic_module(pattern, labelled=False, val_samples=4, val_batch_size=4)
    (images, labels), = list(unlabelled.val_dataloader())
    assert labels.tolist() == [-1, -1, -1, -1] and unlabelled.skipped == 0
    assert torch.allclose(images[:, 0, 0, 0], torch.tensor([0, 10, 20, 30]) / 127.5 - 1)
    labelled = synthetic_module(pattern, val_samples=4, val_batch_size=4)
    with pytest.raises(DataFault, match=r"pass over val_shards .*u-000000.tar' read no sample .*no 'cls' label member"):
        list(labelled.val_dataloader())
    assert labelled.skipped == 4 and labelled.samples_read == 0


def truncate_in_member(path, member_index):
    """Cut a tar file in the middle of the data of its ``member_index``-th member."""
    with tarfile.open(path) as tar:
        member = tar.getmembers()[member_index]
    with open(path, "r+b") as handle:
        handle.truncate(member.offset_data + member.size // 2)


def test_corrupt_shards_and_samples_are_skipped_and_counted(tmp_path):
    good = encoded(smooth_image(16, 16, seed=1), "JPEG", quality=90)
    samples = [{"__key__": f"a{i}", "jpg": good, "cls": i} for i in range(4)]
    samples[1]["jpg"] = good[: len(good) // 2]
    samples.append({"__key__": "a4", "cls": 4})
    write_shards(samples, str(tmp_path / "c-%06d.tar"), 5, progress=False)
    pngs = [{"__key__": f"b{i}", "png": png_bytes(i), "cls": 10 + i} for i in range(4)]
    write_shards(pngs, str(tmp_path / "d-%06d.tar"), 4, progress=False)
    truncate_in_member(tmp_path / "d-000000.tar", 5)
    pattern = f"{tmp_path}/c-000000.tar::{tmp_path}/d-000000.tar"
    module = synthetic_module(pattern, val_samples=9, val_batch_size=9, image_size=16, channels=3)
    module.setup("validate")
    (_, labels), = list(module.val_dataloader())
    assert labels.tolist() == [0, 2, 3, 10, 11]  # b2, cut in its png, is dropped
    assert (module.samples_read, module.skipped) == (5, 4)
    reasons = module.skip_reasons
    assert sum(count for reason, count in reasons.items() if reason.startswith("OSError")) == 1  # the corrupt JPEG
    assert reasons["KeyError: sample has no png/jpg/jpeg/webp member: ['cls']"] == 1
    cut = "shard unreadable or cut short (ReadError: unexpected end of data)"
    assert reasons[f"{cut}; the samples after the cut are uncounted (no manifest.json count)"] == 1
    assert reasons["the shards hold fewer samples than val_samples=9"] == 1
    assert module.skip_examples[f"{cut}; the samples after the cut are uncounted (no manifest.json count)"] == ["d-000000.tar"]

    trainer_side = synthetic_module(pattern, val_shards=None, batch_size=8, train_samples_per_epoch=8, image_size=16, channels=3)
    (_, labels), = list(trainer_side.train_dataloader())
    assert set(labels.tolist()) <= {0, 2, 3, 10, 11} and trainer_side.samples_read >= 8 and trainer_side.skipped > 0
    strict = synthetic_module(pattern, val_samples=9, val_batch_size=9, image_size=16, channels=3, max_errors=2)
    with pytest.raises(DataFault, match=r"^val: more than max_errors=2 samples failed to read or decode \(3 skipped\)"):
        list(strict.val_dataloader())


def test_read_skip_counts_and_reasons_are_shared_across_workers(tmp_path):
    pattern = write_synthetic(tmp_path, 9, 3, corrupt={2, 7})
    module = synthetic_module(pattern, val_batch_size=2, num_workers=2)
    module.setup("validate")
    labels = [label for _, batch in module.val_dataloader() for label in batch.tolist()]
    assert sorted(labels) == [0, 1, 3, 4, 5, 6, 8]
    assert (module.samples_read, module.skipped) == (7, 2)
    (reason, count), = module.skip_reasons.items()
    assert reason.startswith("UnidentifiedImageError") and count == 2


def test_shared_skip_reasons_are_bounded():
    counter = SkipCounter(shared=True, max_reasons=2, log_first=0)
    for reason in ["a", "b", "a", "c", "d"]:
        counter(ValueError(reason))
    counter.count_read(3)
    assert counter.reasons == {"ValueError: a": 2, "ValueError: b": 1, "<other>": 2}
    assert (counter.read, counter.skipped) == (3, 5)
    counter.reset()
    assert (counter.read, counter.skipped, counter.reasons) == (0, 0, {})


def test_preflight_names_bad_patterns_and_warns_about_few_shards(tmp_path, monkeypatch, caplog):
    with pytest.raises(ValueError, match="'::'"):
        synthetic_module("::").setup("fit")
    pattern = write_synthetic(tmp_path, 4, 2)
    with pytest.raises(FileNotFoundError, match=r"syn-000002.tar \(from shard pattern .*syn-\{000000..000007\}.tar"):
        synthetic_module(pattern.replace("000001}", "000007}")).setup("fit")
    module = with_rank(monkeypatch, synthetic_module(pattern, num_workers=3), 0, 2)
    with caplog.at_level(logging.WARNING, logger="maskdiff.data"):
        module.setup("fit")
    assert "2 training shards for 6 readers (2 ranks x 3 workers)" in caplog.text
    remote = synthetic_module("pipe:cat /nowhere/a-{000000..000003}.tar", val_shards="https://host/v.tar",
                              train_samples_per_epoch=10, val_samples=4)
    remote.setup("fit")
    assert remote._train_urls[0] == "pipe:cat /nowhere/a-000000.tar"


# DataHealth


class _FlatClassifier(L.LightningModule):
    def __init__(self, features):
        super().__init__()
        self.layer = torch.nn.Linear(features, 1000)

    def training_step(self, batch, batch_idx):
        images, labels = batch
        return torch.nn.functional.cross_entropy(self.layer(images.flatten(1)), labels)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class _MetricsRecorder(L.pytorch.loggers.Logger):
    name, version = "recorder", 0

    def __init__(self):
        super().__init__()
        self.metrics = []

    @property
    def experiment(self):
        return None

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.metrics.append(dict(metrics))


def test_data_health_logs_read_and_skipped_counts(tmp_path, capsys):
    from maskdiff.callbacks import DataHealth

    pattern = write_synthetic(tmp_path, 6, 3, corrupt={4})
    module = synthetic_module(pattern, val_shards=None, batch_size=5, train_samples_per_epoch=10)
    recorder = _MetricsRecorder()
    trainer = L.Trainer(
        max_epochs=2, accelerator="cpu", devices=1, logger=recorder, callbacks=[DataHealth(top_k=3)],
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path, log_every_n_steps=1, limit_val_batches=0,
    )
    trainer.fit(_FlatClassifier(64), datamodule=module)
    epoch_logs = [m for m in recorder.metrics if "data/read" in m and "epoch" in m]
    assert len(epoch_logs) == 2
    assert epoch_logs[-1]["data/read"] >= 20 and epoch_logs[-1]["data/skipped"] >= 1
    final = recorder.metrics[-1]
    assert final == {"data/read": module.samples_read, "data/skipped": module.skipped}
    assert trainer.callback_metrics["data/skipped"] >= 1
    printed = capsys.readouterr().out
    assert f"maskdiff: data read {module.samples_read:,} samples, skipped {module.skipped:,}" in printed
    assert "UnidentifiedImageError" in printed


DDP_SCRIPT = '''
import json
import sys

import lightning as L
import torch

from maskdiff.callbacks import DataHealth
from maskdiff.data import ImageShardsDataModule


class Collect(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(64, 1000)
        self.seen, self.batches = [], 0

    def training_step(self, batch, batch_idx):
        return torch.nn.functional.cross_entropy(self.layer(batch[0].flatten(1)), batch[1])

    def validation_step(self, batch, batch_idx):
        self.seen += batch[1].tolist()
        self.batches += 1

    def on_validation_epoch_end(self):
        gathered = [None] * self.trainer.world_size
        torch.distributed.all_gather_object(gathered, {"labels": self.seen, "batches": self.batches})
        if self.trainer.is_global_zero:
            with open(sys.argv[2], "w") as handle:
                json.dump(gathered, handle)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


module = ImageShardsDataModule(
    train_shards=sys.argv[1], val_shards=sys.argv[1], image_size=8, channels=1, num_classes=1000, batch_size=4,
    val_batch_size=3, num_workers=1, train_samples_per_epoch=16, shuffle_buffer=0,
)
trainer = L.Trainer(
    accelerator="cpu", devices=2, strategy="ddp", max_epochs=1, logger=False, callbacks=[DataHealth()],
    enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0,
)
trainer.fit(Collect(), datamodule=module)
'''


@pytest.mark.slow
def test_two_process_ddp_validation_reads_every_sample_once(tmp_path):
    """Real DDP (2 processes, gloo): ranks validate disjoint samples covering the set, in equal batch counts."""
    pattern = write_synthetic(tmp_path, 23, 5, corrupt={11})
    script = tmp_path / "ddp_validate.py"
    script.write_text(DDP_SCRIPT)
    result_path = tmp_path / "seen.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(script), pattern, str(result_path)], cwd=tmp_path, env=env, capture_output=True,
        text=True, timeout=300, check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    per_rank = json.loads(result_path.read_text())
    assert len(per_rank) == 2 and per_rank[0]["batches"] == per_rank[1]["batches"] == 4
    labels = per_rank[0]["labels"] + per_rank[1]["labels"]
    assert sorted(labels) == [i for i in range(23) if i != 11]
    assert not set(per_rank[0]["labels"]) & set(per_rank[1]["labels"])
    read, skipped = map(int, re.search(r"data read (\d+) samples, skipped (\d+)", result.stdout).groups())
    assert read >= 16 + 22 and skipped >= 1
    assert "UnidentifiedImageError" in result.stdout
