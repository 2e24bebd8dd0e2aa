"""Checkpoints on disk (:mod:`maskdiff.checkpoint_io`): a full disk or a killed process during a save leaves the
previous ``last.ckpt`` intact and loadable; every strategy saves atomically; loading runs no pickled code; the cheap
readability check catches truncated, empty and foreign files and sharded directories."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import textwrap

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.plugins.io import TorchCheckpointIO

from maskdiff.checkpoint_io import (
    AtomicCheckpointIO,
    check_sharded_metadata,
    checkpoint_problem,
    link_checkpoint,
    save_sharded,
    use_atomic_checkpoints,
)
from maskdiff.files import WriteError
from maskdiff.scale import BackboneFSDPStrategy
from maskdiff.tools.main import main
from tests.faults import fill_disk_after, leftovers, small_tmpfs
from tests.helpers import config_in


def fit(config, *args: str) -> None:
    main(["fit", "--config", str(config), "--trainer.limit_val_batches", "0", *args])


def test_a_full_disk_while_saving_last_ckpt_keeps_the_previous_one(tmp_path, digits_cache, monkeypatch):
    config, ckpt_dir = config_in(tmp_path)
    fit(config, "--trainer.max_steps", "2")
    last = ckpt_dir / "last.ckpt"
    before = last.read_bytes()
    failed = fill_disk_after(monkeypatch, limit=4096, target="last.ckpt")
    with pytest.raises(WriteError, match=rf"cannot write {last}: No space left on device \(.* free on its filesystem\)"):
        fit(config, "--trainer.max_steps", "3", "--ckpt_path", "last")
    assert failed, "the save of last.ckpt never ran"
    assert last.read_bytes() == before
    assert torch.load(last, weights_only=True)["global_step"] == 2
    assert leftovers(ckpt_dir) == []


def checkpoint_settings(config, **settings) -> None:
    values = yaml.safe_load(config.read_text())
    values["trainer"]["callbacks"][0]["init_args"].update(settings)
    config.write_text(yaml.safe_dump(values))


def test_a_real_full_tmpfs_while_saving_last_ckpt_keeps_the_previous_one(tmp_path, digits_cache):
    """A weights-only last.ckpt fills most of a small disk; the next run's last.ckpt, with the optimizer state, is
    twice as large and fits neither beside it nor in its place (Lightning's own save truncated last.ckpt here)."""
    config, _ = config_in(tmp_path)
    with small_tmpfs(tmp_path / "disk", "64m") as disk:
        last = disk / "last.ckpt"
        checkpoint_settings(config, dirpath=str(disk), save_top_k=0, enable_version_counter=False,
                            save_weights_only=True)
        fit(config, "--trainer.max_steps", "2")
        before = last.read_bytes()
        room = (13 * len(before) // 10) // 4096 * 4096
        subprocess.run(["mount", "-o", f"remount,size={room}", str(disk)], check=True)
        checkpoint_settings(config, save_weights_only=False)
        with pytest.raises(WriteError, match=rf"^cannot write {last}: No space left on device \(.* free"):
            fit(config, "--trainer.max_steps", "3")
        assert last.read_bytes() == before
        assert torch.load(last, weights_only=True)["global_step"] == 2
        assert os.listdir(disk) == ["last.ckpt"]


KILLED_SAVE = textwrap.dedent("""
    import sys, time, torch
    from maskdiff import files
    from maskdiff.checkpoint_io import AtomicCheckpointIO
    real_open = open
    class Slow:
        def __init__(self, handle): self.handle = handle
        def write(self, data):
            print("writing", flush=True)
            time.sleep(0.05)
            return self.handle.write(data)
        def __getattr__(self, name): return getattr(self.handle, name)
        def __enter__(self): return self
        def __exit__(self, *exc): self.handle.close()
    files.open = lambda path, mode="r", *a, **k: Slow(real_open(path, mode, *a, **k))
    state = {"global_step": 2, "state_dict": {f"w{i}": torch.randn(1000) for i in range(2000)}}
    AtomicCheckpointIO().save_checkpoint(state, sys.argv[1])
""")


def test_sigkill_in_the_middle_of_a_checkpoint_save_keeps_the_previous_one(tmp_path):
    last = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"global_step": 1, "state_dict": {"w": torch.ones(3)}}, last)
    before = last.read_bytes()
    saver = subprocess.Popen([sys.executable, "-c", KILLED_SAVE, str(last)], stdout=subprocess.PIPE, text=True)
    try:
        for _ in range(20):
            assert saver.stdout.readline() == "writing\n"
    finally:
        os.kill(saver.pid, signal.SIGKILL)
        saver.wait()
    assert last.read_bytes() == before
    assert AtomicCheckpointIO().load_checkpoint(last)["global_step"] == 1
    assert checkpoint_problem(last) is None


class RunsCode:
    """A pickle that would create a file when unpickled without ``weights_only``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_loading_runs_no_pickled_code(tmp_path, digits_cache):
    marker = tmp_path / "code-ran"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": RunsCode(marker)}, evil)
    with pytest.raises(ValueError, match=rf"^{evil} does not load as a checkpoint: UnpicklingError: it pickles more "
                                         r"than tensors and plain data \(Unsupported global: GLOBAL io.open[^\n]*\)$"):
        AtomicCheckpointIO().load_checkpoint(evil)
    with pytest.raises(ValueError, match="weights_only=True only"):
        AtomicCheckpointIO().load_checkpoint(evil, weights_only=False)
    config, _ = config_in(tmp_path)
    with pytest.raises((ValueError, pickle.UnpicklingError)):
        fit(config, "--trainer.max_steps", "1", "--ckpt_path", str(evil))
    assert not marker.exists()


def test_every_strategy_saves_through_the_atomic_checkpoint_io(tmp_path):
    for trainer in (L.Trainer(accelerator="cpu", logger=False),
                    L.Trainer(accelerator="cpu", strategy="ddp", devices=2, logger=False)):
        assert type(trainer.strategy.checkpoint_io) is TorchCheckpointIO
        use_atomic_checkpoints(trainer)
        assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    own = TorchCheckpointIO.__new__(type("OwnIO", (TorchCheckpointIO,), {}))
    trainer = L.Trainer(accelerator="cpu", logger=False, plugins=[own])
    use_atomic_checkpoints(trainer)
    assert trainer.strategy.checkpoint_io is own  # a CheckpointIO chosen in the config is kept
    assert isinstance(BackboneFSDPStrategy().checkpoint_io, AtomicCheckpointIO)


def test_save_last_link_replaces_last_ckpt_in_one_step(tmp_path, monkeypatch):
    callback = ModelCheckpoint(dirpath=tmp_path, save_last="link", every_n_train_steps=1)
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, callbacks=[callback],
                        enable_progress_bar=False, enable_model_summary=False)
    use_atomic_checkpoints(trainer)
    assert callback._link_checkpoint is link_checkpoint
    trainer.fit(BoringModel())
    last = tmp_path / "last.ckpt"
    assert last.is_symlink() and os.readlink(last) == "epoch=0-step=2.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 2

    def no_links(*args, **kwargs):
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr(os, "symlink", no_links)  # a filesystem without links: a copy, written atomically
    failed = fill_disk_after(monkeypatch, limit=100, target="last.ckpt")
    with pytest.raises(WriteError, match="No space left on device"):
        link_checkpoint(trainer, str(tmp_path / "epoch=0-step=2.ckpt"), str(last))
    assert failed and last.is_symlink() and leftovers(tmp_path) == []


def test_a_sharded_save_replaces_the_previous_directory_only_when_complete(tmp_path):
    target = tmp_path / "last.ckpt"

    def shards(text):
        def write(folder):
            (folder / "__0_0.distcp").write_text(text)
        return write

    save_sharded(target, shards("first"), finish=lambda folder: torch.save({"global_step": 1}, folder / "meta.pt"))
    with pytest.raises(WriteError, match=rf"cannot write {target}: Input/output error"):
        save_sharded(target, shards("second"), finish=lambda folder: (_ for _ in ()).throw(OSError(5, "Input/output error")))
    assert (target / "__0_0.distcp").read_text() == "first"
    assert torch.load(target / "meta.pt", weights_only=True)["global_step"] == 1
    assert leftovers(tmp_path) == []


def test_sharded_metadata_is_read_without_running_code(tmp_path):
    import torch.distributed.checkpoint as dcp

    folder = tmp_path / "sharded"
    with pytest.warns(UserWarning):
        dcp.save({"model": {"w": torch.ones(2, 3)}, "optimizer_0": {"lr": 0.1, "betas": (0.9, 0.99)}},
                 checkpoint_id=folder, no_dist=True)
    torch.save({"global_step": 5}, folder / "meta.pt")
    check_sharded_metadata(folder)
    assert checkpoint_problem(folder) is None
    marker = tmp_path / "code-ran"
    (folder / ".metadata").write_bytes(pickle.dumps(RunsCode(marker)))
    with pytest.raises(ValueError, match=r"\.metadata is not a readable sharded-checkpoint metadata file .*refused global"):
        check_sharded_metadata(folder)
    assert "refused global io.open" in checkpoint_problem(folder) and not marker.exists()


def test_the_readability_check_catches_what_would_not_load(tmp_path):
    good = tmp_path / "good.ckpt"
    torch.save({"global_step": 3, "state_dict": {"w": torch.ones(1000)}}, good)
    assert checkpoint_problem(good) is None
    data = good.read_bytes()
    (tmp_path / "truncated.ckpt").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.ckpt").write_bytes(b"")
    (tmp_path / "text.ckpt").write_text("not a checkpoint\n")
    torch.save([1, 2], tmp_path / "list.ckpt")
    assert "zip archive" in checkpoint_problem(tmp_path / "truncated.ckpt")
    assert checkpoint_problem(tmp_path / "empty.ckpt") == "an empty file"
    assert checkpoint_problem(tmp_path / "text.ckpt") is not None
    assert checkpoint_problem(tmp_path / "list.ckpt") == "holds a list, not a checkpoint dictionary"
    (tmp_path / "folder").mkdir()
    assert "not a sharded checkpoint" in checkpoint_problem(tmp_path / "folder")
