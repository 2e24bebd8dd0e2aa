"""``fit`` and ``preflight`` find an unwritable run, checkpoint or log directory before anything expensive."""

from __future__ import annotations

import subprocess

import pytest
import yaml

from maskdiff.files import WriteError
from maskdiff.launch.directories import run_directories
from maskdiff.tools.main import main
from tests.faults import small_tmpfs
from tests.helpers import config_in


def blocked(tmp_path):
    """A path under a regular file: no one, root included, can create it."""
    blocker = tmp_path / "file.txt"
    blocker.write_text("a regular file")
    return blocker / "out"


def with_checkpoint_dir(config, dirpath) -> None:
    values = yaml.safe_load(config.read_text())
    values["trainer"]["callbacks"][0]["init_args"]["dirpath"] = str(dirpath)
    config.write_text(yaml.safe_dump(values))


def test_the_directories_of_a_config(tmp_path):
    config, ckpt_dir = config_in(tmp_path)
    assert run_directories(yaml.safe_load(config.read_text())) == [
        ("run directory (trainer.default_root_dir)", str(tmp_path)),
        ("checkpoint directory (ModelCheckpoint dirpath)", str(ckpt_dir)),
        ("CSVLogger save_dir", str(tmp_path / "logs")),
    ]


def test_preflight_reports_an_unwritable_checkpoint_directory(tmp_path, capsys):
    config, _ = config_in(tmp_path)
    with pytest.raises(SystemExit) as ended:
        main(["preflight", "--config", str(config)])
    assert ended.value.code == 0 and "[writable]" not in capsys.readouterr().out
    assert not (tmp_path / "checkpoints").exists()  # the preflight creates nothing
    target = blocked(tmp_path) / "checkpoints"
    with_checkpoint_dir(config, target)
    with pytest.raises(SystemExit) as ended:
        main(["preflight", "--config", str(config)])
    printed = capsys.readouterr().out
    assert ended.value.code == 2 and "maskdiff preflight FAILED" in printed
    assert (f"error [writable]: checkpoint directory (ModelCheckpoint dirpath) {target} is not writable: it exists "
            f"and is not a directory (at {tmp_path / 'file.txt'})") in printed


@pytest.mark.parametrize("setting", ["checkpoints", "logger", "root"])
def test_fit_stops_on_an_unwritable_directory_before_reading_data(tmp_path, monkeypatch, setting):
    cache = tmp_path / "cache"
    monkeypatch.setenv("MASKDIFF_CACHE", str(cache))  # digits shards would be written here once data is prepared
    config, _ = config_in(tmp_path)
    target = blocked(tmp_path)
    option = {"checkpoints": [], "logger": ["--trainer.logger.init_args.save_dir", str(target)],
              "root": ["--trainer.default_root_dir", str(target)]}[setting]
    if setting == "checkpoints":
        with_checkpoint_dir(config, target)
    with pytest.raises(WriteError, match=rf"{target} is not writable: Not a directory$"):
        main(["fit", "--config", str(config), "--trainer.max_steps", "1", *option])
    assert not cache.exists()


def test_fit_stops_on_a_read_only_checkpoint_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("MASKDIFF_CACHE", str(tmp_path / "cache"))
    config, _ = config_in(tmp_path)
    with small_tmpfs(tmp_path / "ro", "64k") as mount:
        subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
        with_checkpoint_dir(config, mount)
        with pytest.raises(WriteError, match=rf"^checkpoint directory \(ModelCheckpoint dirpath\) {mount} is not "
                                             "writable: Read-only file system$"):
            main(["fit", "--config", str(config), "--trainer.max_steps", "1"])
    assert not (tmp_path / "cache").exists()
