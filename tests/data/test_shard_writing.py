"""Shards and manifests are written atomically: a stopped or failing writer leaves the shards it finished, no
partial shard, and the previous manifest."""

from __future__ import annotations

import os
import tarfile

import pytest

from maskdiff.data.shards import read_manifest, write_manifest, write_shards
from maskdiff.files import WriteError
from tests.faults import fill_disk_after, leftovers


def samples(count, fail_at=None):
    for index in range(count):
        if index == fail_at:
            raise KeyboardInterrupt  # e.g. Ctrl-C or SIGTERM while the third shard is being written
        yield {"__key__": f"{index:04d}", "txt": f"sample {index}"}


def test_a_stopped_writer_leaves_complete_shards_only(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        write_shards(samples(10, fail_at=5), str(tmp_path / "part-%06d.tar"), max_samples=2, progress=False)
    assert sorted(os.listdir(tmp_path)) == ["part-000000.tar", "part-000001.tar"]
    for name, keys in (("part-000000.tar", ["0000.txt", "0001.txt"]), ("part-000001.tar", ["0002.txt", "0003.txt"])):
        with tarfile.open(tmp_path / name) as shard:
            assert shard.getnames() == keys


def test_a_full_disk_keeps_the_previous_shard_and_names_it(tmp_path, monkeypatch):
    shards = write_shards(samples(3), str(tmp_path / "part-%06d.tar"), max_samples=3, progress=False)
    before = (tmp_path / "part-000000.tar").read_bytes()
    fill_disk_after(monkeypatch, limit=700, target="part-000000.tar")
    with pytest.raises(WriteError, match=rf"^cannot write {tmp_path / 'part-000000.tar'}: No space left on device"):
        write_shards(samples(3), str(tmp_path / "part-%06d.tar"), max_samples=3, progress=False)
    assert shards == [{"path": str(tmp_path / "part-000000.tar"), "samples": 3}]
    assert (tmp_path / "part-000000.tar").read_bytes() == before and leftovers(tmp_path) == []


def test_no_samples_write_no_shard(tmp_path):
    assert write_shards([], str(tmp_path / "part-%06d.tar"), max_samples=2, progress=False) == []
    assert os.listdir(tmp_path) == []


def test_a_manifest_write_that_fails_keeps_the_previous_manifest(tmp_path, monkeypatch):
    write_manifest(tmp_path / "manifest.json", {"total": 3})
    fill_disk_after(monkeypatch, limit=5, target="manifest.json")
    with pytest.raises(WriteError):
        write_manifest(tmp_path / "manifest.json", {"total": 4, "splits": {}})
    assert read_manifest(tmp_path / "manifest.json") == {"total": 3} and leftovers(tmp_path) == []


def test_the_writing_bar_follows_maskdiff_progress(tmp_path, capsys, monkeypatch):
    for name in ("RANK", "SLURM_PROCID", "LOCAL_RANK", "MASKDIFF_PROGRESS"):
        monkeypatch.delenv(name, raising=False)
    pattern = str(tmp_path / "part-%06d.tar")
    write_shards(samples(3), pattern, max_samples=2)
    assert capsys.readouterr().err == ""  # stderr is no terminal under pytest: no bar
    monkeypatch.setenv("MASKDIFF_PROGRESS", "1")
    write_shards(samples(3), pattern, max_samples=2, total=3)
    bar = capsys.readouterr().err
    assert "writing part-%06d.tar" in bar and "3/3" in bar
    write_shards(samples(3), pattern, max_samples=2, progress=False)
    assert capsys.readouterr().err == ""
