import io
import logging
import os
import tarfile
import time

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

from maskdiff.data import (
    DigitsDataModule,
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
        assert counter(ValueError("bad png")) is True
        assert counter(ValueError("bad png")) is True
        assert counter(KeyError("cls")) is True
    assert time.perf_counter() - start < 0.1
    assert counter.skipped == 3
    assert counter.reasons == {"ValueError: bad png": 2, "KeyError: 'cls'": 1}
    assert len(caplog.records) == 2
    with pytest.raises(OSError, match="truncated"):
        counter(OSError("truncated"))


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
    with pytest.raises(RuntimeError, match="consecutive"):
        next(iter(module.train_dataloader()))
    assert module.skipped == 1000
