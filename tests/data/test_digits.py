import io
import os
import tarfile

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from maskdiff.data import digits as digits_module
from maskdiff.data import ensure_digits_shards, expand_urls, read_manifest, write_digits_shards


def read_tar_samples(path):
    """{key: {ext: bytes}} of one tar shard, in file order."""
    samples = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, ext = member.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def split_samples(root, manifest, split):
    samples = {}
    for url in expand_urls(os.path.join(root, manifest["splits"][split]["pattern"])):
        samples.update(read_tar_samples(url))
    return samples


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits")
    return root, write_digits_shards(root)


def test_split_counts_labels_and_manifest(written):
    root, manifest = written
    sklearn_digits = load_digits()
    assert manifest["total"] == 1797
    assert manifest["classes"] == list(range(10))
    assert manifest == read_manifest(root / "manifest.json")
    keys = {}
    for split in ("train", "val"):
        info = manifest["splits"][split]
        urls = expand_urls(str(root / info["pattern"]))
        assert [os.path.basename(u) for u in urls] == [s["path"] for s in info["shards"]]
        assert all(os.path.isfile(u) for u in urls)
        samples = split_samples(root, manifest, split)
        assert len(samples) == info["samples"] == sum(s["samples"] for s in info["shards"])
        keys[split] = set(samples)
        labels = {int(s["cls"]) for s in samples.values()}
        assert labels == set(range(10))
        for key, sample in samples.items():
            assert int(sample["cls"]) == sklearn_digits.target[int(key)]
    assert manifest["splits"]["train"]["samples"] + manifest["splits"]["val"]["samples"] == 1797
    assert manifest["splits"]["val"]["samples"] == 300
    assert not keys["train"] & keys["val"]
    assert {int(k) for k in keys["train"] | keys["val"]} == set(range(1797))
    tar_files = {name for name in os.listdir(root) if name.endswith(".tar")}
    assert tar_files == {s["path"] for split in manifest["splits"].values() for s in split["shards"]}


def test_png_pixels_are_rounded_sklearn_values(written):
    root, manifest = written
    images = load_digits().images
    samples = split_samples(root, manifest, "val")
    for key in sorted(samples)[:20]:
        decoded = np.asarray(Image.open(io.BytesIO(samples[key]["png"])))
        assert decoded.shape == (8, 8) and decoded.dtype == np.uint8
        expected = np.array([[round(v * 255 / 16) for v in row] for row in images[int(key)]])
        np.testing.assert_array_equal(decoded, expected)


def test_same_seed_writes_identical_bytes(tmp_path):
    first = write_digits_shards(tmp_path / "a", seed=3)
    second = write_digits_shards(tmp_path / "b", seed=3)
    assert first == second
    names = sorted(os.listdir(tmp_path / "a"))
    assert names == sorted(os.listdir(tmp_path / "b"))
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    other = write_digits_shards(tmp_path / "c", seed=4, samples_per_shard=2000)
    assert len(other["splits"]["train"]["shards"]) == 1
    assert other["splits"]["train"]["pattern"] == "digits-train-000000.tar"
    val_a = split_samples(tmp_path / "a", first, "val")
    val_c = split_samples(tmp_path / "c", other, "val")
    assert set(val_a) != set(val_c)


def test_ensure_writes_once_then_reuses(tmp_path, monkeypatch):
    monkeypatch.setenv("MASKDIFF_CACHE", str(tmp_path))
    manifest = ensure_digits_shards()
    assert manifest["root"] == str((tmp_path / "digits").resolve())
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "digits").iterdir()}

    def fail(*args, **kwargs):
        raise AssertionError("shards were rewritten")

    monkeypatch.setattr(digits_module, "write_digits_shards", fail)
    assert ensure_digits_shards(tmp_path) == manifest
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "digits").iterdir()} == stamps
    assert os.listdir(tmp_path) == ["digits"]


def test_ensure_survives_a_concurrent_writer(tmp_path, monkeypatch):
    """Another process (rank) finishes writing while this one is still writing its private copy."""
    real_write = digits_module.write_digits_shards

    def write_after_other_rank(out_dir, **kwargs):
        monkeypatch.setattr(digits_module, "write_digits_shards", real_write)
        ensure_digits_shards(tmp_path)
        return real_write(out_dir, **kwargs)

    monkeypatch.setattr(digits_module, "write_digits_shards", write_after_other_rank)
    manifest = ensure_digits_shards(tmp_path)
    assert manifest["splits"]["val"]["samples"] == 300
    assert os.listdir(tmp_path) == ["digits"]


def test_ensure_refuses_a_foreign_folder(tmp_path):
    (tmp_path / "digits").mkdir()
    (tmp_path / "digits" / "notes.txt").write_text("not shards")
    with pytest.raises(RuntimeError, match="digits"):
        ensure_digits_shards(tmp_path)
