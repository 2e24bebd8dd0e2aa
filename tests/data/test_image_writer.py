"""``maskdiff shards images``: folder trees and file lists to shards, and back through the DataModule."""

import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from maskdiff.tools.main import main
from maskdiff.data import (
    DataFault,
    ImageShardsDataModule,
    expand_urls,
    list_images,
    read_manifest,
    write_image_shards,
)


def image_bytes(value, fmt="PNG", size=(6, 4)):
    """A flat colour image whose red channel is ``value`` (lossless formats keep it exactly)."""
    buffer = io.BytesIO()
    Image.new("RGB", size, (value, 255 - value, 7)).save(buffer, format=fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    return buffer.getvalue()


@pytest.fixture
def image_tree(tmp_path):
    """``src/<class>/...``: 'cat' 3 images (png, JPEG, jpeg), 'dog' 2 (webp, png), plus files to ignore."""
    src = tmp_path / "src"
    files = {
        "dog/b.png": image_bytes(40),
        "dog/nested/a.webp": image_bytes(30, "WEBP"),
        "cat/z.png": image_bytes(10),
        "cat/y.JPEG": image_bytes(20, "JPEG"),
        "cat/x.jpeg": image_bytes(25, "JPEG"),
        "cat/notes.txt": b"not an image",
    }
    for name, data in files.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(data)
    (src / ".hidden").mkdir()
    return src


def tar_members(path):
    with tarfile.open(path) as tar:
        return {member.name: tar.extractfile(member).read() for member in tar.getmembers()}


def read_all(out, prefix, **kwargs):
    """Every sample of the split ``prefix`` through the DataModule's evaluation stream: (images, labels)."""
    manifest = read_manifest(out / "manifest.json")
    pattern = str(out / manifest["splits"][prefix]["pattern"])
    module = ImageShardsDataModule(
        train_shards=pattern, val_shards=pattern, image_size=4, channels=3, num_classes=2, val_batch_size=64,
        num_workers=0, **kwargs,
    )
    module.setup("validate")
    (images, labels), = list(module.val_dataloader())
    return images, labels, module


def test_folder_tree_round_trip(image_tree, tmp_path):
    out = tmp_path / "shards"
    manifest = write_image_shards(image_tree, out, prefix="pets-train", max_samples=2, progress=False)
    assert manifest["classes"] == ["cat", "dog"] and manifest["total"] == 5
    split = manifest["splits"]["pets-train"]
    assert split["pattern"] == "pets-train-{000000..000002}.tar" and split["labelled"] is True
    assert [shard["samples"] for shard in split["shards"]] == [2, 2, 1] and split["skipped"] == []
    members = {}
    for url in expand_urls(str(out / split["pattern"])):
        members |= tar_members(url)
    assert sorted(members) == [
        "00000000.cls", "00000000.jpg", "00000000.json", "00000001.cls", "00000001.jpg", "00000001.json",
        "00000002.cls", "00000002.json", "00000002.png", "00000003.cls", "00000003.json", "00000003.png",
        "00000004.cls", "00000004.json", "00000004.webp",
    ]
    assert members["00000001.jpg"] == (image_tree / "cat/y.JPEG").read_bytes()
    assert json.loads(members["00000004.json"]) == {"path": "dog/nested/a.webp", "class": "dog"}
    assert [members[f"0000000{i}.cls"] for i in range(5)] == [b"0", b"0", b"0", b"1", b"1"]

    images, labels, module = read_all(out, "pets-train")
    assert labels.tolist() == [0, 0, 0, 1, 1] and module.skipped == 0
    red = images[:, 0, 0, 0]
    assert torch.allclose(red[[2, 3, 4]], torch.tensor([10.0, 40.0, 30.0]) / 127.5 - 1)
    assert torch.allclose(red[:2], torch.tensor([25.0, 20.0]) / 127.5 - 1, atol=4 / 127.5)


def test_file_lists_labelled_and_unlabelled(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for index in range(4):
        (folder / f"im{index}.png").write_bytes(image_bytes(50 + index))
    (tmp_path / "labelled.txt").write_text("# path label\nimages/im2.png 1\n\nimages/im0.png 0\n" f"{folder}/im3.png 1\n")
    (tmp_path / "unlabelled.txt").write_text("images/im1.png\nimages/im0.png\n")
    entries, classes, root = list_images(tmp_path / "labelled.txt")
    assert classes is None and root == tmp_path and [e.label for e in entries] == [1, 0, 1]

    out = tmp_path / "shards"
    write_image_shards(tmp_path / "labelled.txt", out, prefix="train", progress=False)
    manifest = write_image_shards(tmp_path / "unlabelled.txt", out, prefix="extra", progress=False)
    assert manifest["classes"] == [0, 1] and manifest["total"] == 5
    assert manifest["splits"]["extra"]["labelled"] is False and manifest["splits"]["train"]["labelled"] is True

    images, labels, _ = read_all(out, "train")
    assert labels.tolist() == [1, 0, 1]
    assert torch.allclose(images[:, 0, 0, 0], torch.tensor([52.0, 50.0, 53.0]) / 127.5 - 1)
    json_paths = [json.loads(m) for name, m in tar_members(out / "train-000000.tar").items() if name.endswith("json")]
    assert json_paths == [{"path": "images/im2.png"}, {"path": "images/im0.png"}, {"path": "images/im3.png"}]

    images, labels, _ = read_all(out, "extra", labelled=False)
    assert labels.tolist() == [-1, -1]
    with pytest.raises(DataFault, match=r"read no sample .*2 skipped so far: KeyError: sample has no 'cls' label member"):
        read_all(out, "extra")

    (tmp_path / "mixed.txt").write_text("images/im1.png 0\nimages/im0.png\n")
    with pytest.raises(ValueError, match=r"mixed.txt:2: 'images/im0.png' -- lines must all be"):
        write_image_shards(tmp_path / "mixed.txt", out, progress=False)
    with pytest.raises(FileNotFoundError, match="no image folder or file list"):
        write_image_shards(tmp_path / "absent", out, progress=False)


def test_writer_output_is_deterministic_and_shuffle_is_seeded(image_tree, tmp_path):
    def shard_bytes(out):
        return {path.name: path.read_bytes() for path in sorted(out.iterdir())}

    write_image_shards(image_tree, tmp_path / "a", max_samples=2, progress=False)
    write_image_shards(image_tree, tmp_path / "b", max_samples=2, progress=False, workers=1)
    assert shard_bytes(tmp_path / "a") == shard_bytes(tmp_path / "b")

    write_image_shards(image_tree, tmp_path / "c", max_samples=5, shuffle_seed=3, progress=False)
    write_image_shards(image_tree, tmp_path / "d", max_samples=5, shuffle_seed=3, progress=False)
    assert shard_bytes(tmp_path / "c") == shard_bytes(tmp_path / "d")
    keys = [name.split(".")[0] for name in tar_members(tmp_path / "c" / "images-000000.tar")][::3]
    assert sorted(keys) == [f"{i:08d}" for i in range(5)] and keys != sorted(keys)


def test_unreadable_files_are_skipped_and_listed(image_tree, tmp_path):
    (image_tree / "cat" / "broken.jpg").write_bytes(b"\xff\xd8 definitely not a jpeg")
    (image_tree / "dog" / "empty.png").write_bytes(b"")
    truncated = image_bytes(90, "PNG", size=(64, 64))
    (image_tree / "dog" / "truncated.png").write_bytes(truncated[: len(truncated) // 2])
    header_checked = write_image_shards(image_tree, tmp_path / "header", progress=False)
    skipped = header_checked["splits"]["images"]["skipped"]
    assert [entry["path"] for entry in skipped] == ["cat/broken.jpg", "dog/empty.png", "dog/truncated.png"]
    assert all(entry["reason"] for entry in skipped)
    assert header_checked["splits"]["images"]["samples"] == 5
    decoded = write_image_shards(image_tree, tmp_path / "decode", verify="decode", progress=False)
    assert len(decoded["splits"]["images"]["skipped"]) == 3

    (tmp_path / "list.txt").write_text("src/cat/z.png 0\nsrc/cat/notes.txt 0\n")
    listed = write_image_shards(tmp_path / "list.txt", tmp_path / "listed", progress=False)
    (bad,) = listed["splits"]["images"]["skipped"]
    assert bad["path"] == "src/cat/notes.txt" and "unsupported image extension" in bad["reason"]


def test_max_bytes_starts_new_shards(tmp_path):
    src = tmp_path / "src" / "only"
    src.mkdir(parents=True)
    for index in range(4):
        (src / f"{index}.png").write_bytes(image_bytes(index, size=(32, 32)))
    manifest = write_image_shards(tmp_path / "src", tmp_path / "out", max_bytes=2 * len(image_bytes(0, size=(32, 32))), progress=False)
    assert [shard["samples"] for shard in manifest["splits"]["images"]["shards"]] == [2, 2]


def test_cli_writes_imagenet_style_shards(image_tree, tmp_path, capsys):
    (image_tree / "cat" / "broken.jpg").write_bytes(b"nope")
    out = tmp_path / "in1k"
    main(["shards", "images", str(image_tree), str(out), "--prefix", "imagenet-train", "--max_samples", "4",
          "--shuffle_seed", "0", "--workers", "2"])
    printed = capsys.readouterr().out
    assert f"wrote {out}: 5 images in 2 shards (imagenet-train-{{000000..000001}}.tar), 1 skipped" in printed
    assert "skipped cat/broken.jpg: UnidentifiedImageError" in printed
    assert sorted(path.name for path in out.iterdir()) == ["imagenet-train-000000.tar", "imagenet-train-000001.tar", "manifest.json"]
    images, labels, _ = read_all(out, "imagenet-train", crop="adm_center")
    assert images.shape == (5, 3, 4, 4) and sorted(labels.tolist()) == [0, 0, 0, 1, 1]
    assert np.isfinite(images.numpy()).all()
