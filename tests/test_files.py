"""Atomic writes (:mod:`maskdiff.files`): a full disk, an error or a killed writer leaves the previous file as it
was and no partial file; the error names the path and the free space; unwritable directories are found early."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from PIL import Image

from maskdiff import files
from maskdiff.files import (
    WriteError,
    atomic_directory,
    ensure_writable_directory,
    link_or_copy,
    save_image,
    save_npz,
    save_torch,
    writable_directory_problem,
    write_json,
)
from maskdiff.inpainting.video import write_animation
from maskdiff.methods.checkpoints import write_method_checkpoint
from tests.faults import fill_disk_after, leftovers, small_tmpfs


def test_a_write_replaces_the_target_and_leaves_nothing_beside_it(tmp_path):
    target = tmp_path / "deep" / "record.json"
    write_json(target, {"a": 1})
    write_json(target, {"a": 2})
    assert target.read_text() == '{\n  "a": 2\n}\n'
    assert os.listdir(target.parent) == ["record.json"]


@pytest.mark.parametrize("write", [
    lambda path: save_torch({"weights": torch.arange(100_000)}, path),
    lambda path: save_npz(path, np.arange(100_000)),
    lambda path: save_image(Image.fromarray(np.random.default_rng(0).integers(0, 255, (128, 128), np.uint8)), path),
], ids=["torch", "npz", "png"])
def test_a_full_disk_keeps_the_previous_file_and_names_path_and_free_space(tmp_path, monkeypatch, write):
    target = tmp_path / "out.png"
    target.write_bytes(b"the previous, complete file")
    opened = fill_disk_after(monkeypatch, limit=1000)
    with pytest.raises(WriteError) as failure:
        write(target)
    assert failure.value.errno == errno.ENOSPC
    message = str(failure.value)
    assert message.startswith(f"cannot write {target}: No space left on device (") and "free on its filesystem" in message
    assert "\n" not in message
    assert opened and opened[0].parent == tmp_path and opened[0] != target  # the temporary sat beside the target
    assert target.read_bytes() == b"the previous, complete file"
    assert os.listdir(tmp_path) == ["out.png"]


def test_a_real_full_tmpfs_keeps_the_previous_checkpoint(tmp_path):
    with small_tmpfs(tmp_path / "disk", "256k") as disk:
        target = disk / "last.ckpt"
        save_torch({"step": 1, "weights": torch.ones(1000)}, target)
        before = target.read_bytes()
        with pytest.raises(WriteError, match=r"cannot write .*last\.ckpt: No space left on device \(.* free"):
            save_torch({"step": 2, "weights": torch.ones(200_000)}, target)
        assert target.read_bytes() == before
        assert torch.load(target, weights_only=True)["step"] == 1
        assert leftovers(disk) == []


def test_an_error_inside_the_writer_keeps_the_previous_file(tmp_path):
    target = tmp_path / "value.pt"
    save_torch({"ok": True}, target)
    with pytest.raises(AttributeError, match="Can't pickle"):
        save_torch({"first": torch.ones(1000), "bad": lambda: None}, target)  # fails midway: cannot be pickled
    assert torch.load(target, weights_only=True) == {"ok": True} and leftovers(tmp_path) == []


KILLED_WRITER = textwrap.dedent("""
    import sys, torch
    from maskdiff import files
    real_open = open
    class Slow:
        def __init__(self, handle): self.handle = handle
        def write(self, data):
            print("writing", flush=True)
            import time; time.sleep(0.05)
            return self.handle.write(data)
        def __getattr__(self, name): return getattr(self.handle, name)
        def __enter__(self): return self
        def __exit__(self, *exc): self.handle.close()
    files.open = lambda path, mode="r", *a, **k: Slow(real_open(path, mode, *a, **k))
    files.save_torch({"step": 2, "weights": [torch.randn(1000) for _ in range(2000)]}, sys.argv[1])
""")


def test_sigkill_in_the_middle_of_a_save_keeps_the_previous_file(tmp_path):
    target = tmp_path / "last.ckpt"
    save_torch({"step": 1, "weights": torch.ones(10)}, target)
    before = target.read_bytes()
    writer = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(target)], stdout=subprocess.PIPE, text=True)
    try:
        for _ in range(20):  # let it write a good part of the new file
            assert writer.stdout.readline() == "writing\n"
        partial = [name for name in os.listdir(tmp_path) if name != "last.ckpt"]
        assert len(partial) == 1 and (tmp_path / partial[0]).stat().st_size > 0
    finally:
        os.kill(writer.pid, signal.SIGKILL)
        writer.wait()
    assert target.read_bytes() == before and torch.load(target, weights_only=True)["step"] == 1
    save_torch({"step": 3}, target)  # the next save removes what the killed writer left
    assert os.listdir(tmp_path) == ["last.ckpt"] and torch.load(target, weights_only=True) == {"step": 3}


def test_a_directory_replaces_the_previous_one_only_when_complete(tmp_path):
    target = tmp_path / "last.ckpt"
    with atomic_directory(target) as folder:
        (folder / "shard0").write_text("first")
    with pytest.raises(OSError), atomic_directory(target) as folder:
        (folder / "shard0").write_text("second, half")
        raise OSError(errno.EIO, "I/O error")
    assert [p.name for p in target.iterdir()] == ["shard0"] and (target / "shard0").read_text() == "first"
    with atomic_directory(target) as folder:
        (folder / "shard1").write_text("second")
    assert [p.name for p in target.iterdir()] == ["shard1"] and leftovers(tmp_path) == []


def test_a_directory_set_aside_by_a_killed_writer_is_put_back(tmp_path):
    target = tmp_path / "last.ckpt"
    aside = tmp_path / f".last.ckpt.{files._host()}.999999999.abcd.old.ckpt"  # no such process
    aside.mkdir()
    (aside / "meta.pt").write_text("previous")
    files.clean_leftovers(target)
    assert (target / "meta.pt").read_text() == "previous" and leftovers(tmp_path) == []


def test_a_link_replaces_the_previous_file_in_one_step(tmp_path):
    newest = tmp_path / "step2.ckpt"
    newest.write_text("2")
    last = tmp_path / "last.ckpt"
    last.write_text("1")
    link_or_copy(newest, last)
    assert last.is_symlink() and os.readlink(last) == "step2.ckpt" and last.read_text() == "2"


def test_unwritable_directories_are_named(tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("a regular file")
    with pytest.raises(OSError, match=rf"^checkpoint directory {blocker}/out is not writable: Not a directory$"):
        ensure_writable_directory(blocker / "out", "checkpoint directory")
    assert "is not writable" in writable_directory_problem(blocker / "out" / "deeper", "run directory")
    fresh = tmp_path / "a" / "b"
    assert writable_directory_problem(fresh) is None and not fresh.exists()  # the check creates nothing
    assert ensure_writable_directory(fresh) == fresh and fresh.is_dir() and os.listdir(fresh) == []


def test_a_read_only_mount_is_unwritable(tmp_path):
    with small_tmpfs(tmp_path / "ro", "64k") as mount:
        subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
        problem = writable_directory_problem(mount / "out", "--out directory")
        assert problem == f"--out directory {mount}/out is not writable: Read-only file system (at {mount})"
        with pytest.raises(WriteError, match="Read-only file system"):
            save_npz(mount / "samples.npz", np.zeros(3))


@pytest.mark.parametrize("suffix", [".gif", ".mp4"])
def test_a_full_disk_keeps_the_previous_animation(tmp_path, suffix):
    frames = np.random.default_rng(0).integers(0, 255, (8, 64, 64, 3), np.uint8)
    with small_tmpfs(tmp_path / "disk", "96k") as disk:
        target = disk / f"clip{suffix}"
        write_animation(frames[:2, :16, :16], target)
        before = target.read_bytes()
        big = np.random.default_rng(1).integers(0, 255, (64, 256, 256, 3), np.uint8)
        with pytest.raises((WriteError, OSError)) as failure:
            write_animation(big, target)
        assert str(target) in str(failure.value) or failure.value.errno == errno.ENOSPC
        assert target.read_bytes() == before
        assert leftovers(disk) == []


def test_a_full_disk_keeps_the_previous_converted_checkpoint(tmp_path, monkeypatch):
    state = {"backbone.weight": torch.ones(100_000)}
    target = tmp_path / "converted.ckpt"
    write_method_checkpoint(target, "maskdiff.methods.DiT", {}, state)
    before = target.read_bytes()
    fill_disk_after(monkeypatch, limit=1000)
    with pytest.raises(WriteError, match="No space left on device"):
        write_method_checkpoint(target, "maskdiff.methods.DiT", {}, {"backbone.weight": torch.zeros(100_000)})
    assert target.read_bytes() == before
    assert leftovers(tmp_path) == []
