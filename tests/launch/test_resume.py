"""``fit --ckpt_path last`` resumes from the newest of ``last.ckpt`` and SLURM's ``hpc_ckpt_<N>.ckpt`` that loads."""

import os
import shutil

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from maskdiff.tools.main import main
from maskdiff.launch.resume import newest_resume_checkpoint, slurm_resume_checkpoint
from tests.helpers import config_in


def _touch(path, mtime, step=0):
    """A small checkpoint that loads, written at ``mtime``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"global_step": step, "state_dict": {}}, path)
    os.utime(path, (mtime, mtime))


def test_the_newest_of_last_and_hpc_checkpoints_is_chosen(tmp_path):
    ckpt_dir = tmp_path / "checkpoints"
    trainer = L.Trainer(default_root_dir=tmp_path, callbacks=[ModelCheckpoint(dirpath=ckpt_dir, save_last=True)],
                        logger=False, accelerator="cpu")
    assert newest_resume_checkpoint(trainer).path is None
    _touch(ckpt_dir / "last.ckpt", 1000)
    _touch(ckpt_dir / "step00000100.ckpt", 3000)  # a periodic checkpoint is not a resume candidate
    _touch(tmp_path / "hpc_ckpt_1.ckpt", 2000)
    assert newest_resume_checkpoint(trainer).path == tmp_path / "hpc_ckpt_1.ckpt"
    _touch(ckpt_dir / "last-v1.ckpt", 4000)
    assert newest_resume_checkpoint(trainer).path == ckpt_dir / "last-v1.ckpt"

    lightning_decides = L.Trainer(default_root_dir=tmp_path, callbacks=[ModelCheckpoint(save_last=True)],
                                  logger=False, accelerator="cpu")
    assert newest_resume_checkpoint(lightning_decides).path is None  # dirpath from the logger: Lightning's own lookup


def test_newer_checkpoints_that_do_not_load_are_skipped_and_named(tmp_path):
    ckpt_dir = tmp_path / "checkpoints"
    trainer = L.Trainer(default_root_dir=tmp_path, callbacks=[ModelCheckpoint(dirpath=ckpt_dir, save_last=True)],
                        logger=False, accelerator="cpu")
    _touch(ckpt_dir / "last.ckpt", 1000, step=10)
    _touch(tmp_path / "hpc_ckpt_2.ckpt", 3000, step=30)
    (tmp_path / "hpc_ckpt_2.ckpt").write_bytes((tmp_path / "hpc_ckpt_2.ckpt").read_bytes()[:300])  # cut short
    os.utime(tmp_path / "hpc_ckpt_2.ckpt", (3000, 3000))
    _touch(ckpt_dir / "last-v1.ckpt", 2000)
    (ckpt_dir / "last-v1.ckpt").write_bytes(b"")
    os.utime(ckpt_dir / "last-v1.ckpt", (2000, 2000))
    choice = newest_resume_checkpoint(trainer)
    assert choice.path == ckpt_dir / "last.ckpt"
    assert [path for path, _ in choice.skipped] == [tmp_path / "hpc_ckpt_2.ckpt", ckpt_dir / "last-v1.ckpt"]
    lines = choice.describe()
    assert lines[0].startswith(f"skipped {tmp_path / 'hpc_ckpt_2.ckpt'}: it does not load (RuntimeError: ")
    assert lines[0].endswith(f"; resuming from {ckpt_dir / 'last.ckpt'}") and "an empty file" in lines[1]
    (ckpt_dir / "last.ckpt").write_text("overwritten by something else")
    with pytest.raises(ValueError, match=r"^no checkpoint to resume from loads: .*hpc_ckpt_2\.ckpt \(RuntimeError"):
        newest_resume_checkpoint(trainer)


def test_a_slurm_job_without_ckpt_path_skips_a_corrupt_hpc_checkpoint(tmp_path, monkeypatch):
    trainer = L.Trainer(default_root_dir=tmp_path, logger=False, accelerator="cpu")
    _touch(tmp_path / "hpc_ckpt_1.ckpt", 1000, step=10)
    _touch(tmp_path / "hpc_ckpt_2.ckpt", 2000, step=20)
    (tmp_path / "hpc_ckpt_2.ckpt").write_bytes(b"")
    assert slurm_resume_checkpoint(trainer).path is None  # not a SLURM job: Lightning does not resume either
    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.setenv("SLURM_JOB_NAME", "train")
    choice = slurm_resume_checkpoint(trainer)
    assert choice.path == tmp_path / "hpc_ckpt_1.ckpt"
    assert choice.skipped == [(tmp_path / "hpc_ckpt_2.ckpt", "an empty file")]


def test_fit_resumes_from_a_newer_hpc_checkpoint(tmp_path, digits_cache, caplog):
    config, ckpt_dir = config_in(tmp_path)
    common = ["fit", "--config", str(config), "--trainer.limit_val_batches", "0", "--ckpt_path", "last"]
    main([*common, "--trainer.max_steps", "2"])  # a first run: no checkpoint yet, starts from step 0
    assert torch.load(ckpt_dir / "last.ckpt", weights_only=True)["global_step"] == 2
    hpc = tmp_path / "hpc_ckpt_1.ckpt"
    shutil.copy(ckpt_dir / "last.ckpt", hpc)
    later = (ckpt_dir / "last.ckpt").stat().st_mtime + 60
    os.utime(hpc, (later, later))
    with caplog.at_level("INFO"):
        main([*common, "--trainer.max_steps", "3"])
    assert f"Restoring states from the checkpoint path at {hpc}" in caplog.text
    assert torch.load(ckpt_dir / "last.ckpt", weights_only=True)["global_step"] == 3


def test_fit_resumes_from_the_older_checkpoint_when_the_newest_is_truncated(tmp_path, digits_cache, capsys, caplog):
    config, ckpt_dir = config_in(tmp_path)
    common = ["fit", "--config", str(config), "--trainer.limit_val_batches", "0", "--ckpt_path", "last"]
    main([*common, "--trainer.max_steps", "2"])
    last = ckpt_dir / "last.ckpt"
    hpc = tmp_path / "hpc_ckpt_1.ckpt"
    data = last.read_bytes()
    hpc.write_bytes(data[: len(data) // 2])  # a save cut short by a dying node
    later = last.stat().st_mtime + 60
    os.utime(hpc, (later, later))
    capsys.readouterr()
    with caplog.at_level("INFO"):
        main([*common, "--trainer.max_steps", "3"])
    warned = capsys.readouterr().err
    assert f"warning: skipped {hpc}: it does not load (RuntimeError: PytorchStreamReader failed" in warned
    assert f"resuming from {last}" in warned
    assert f"Restoring states from the checkpoint path at {last}" in caplog.text
    assert torch.load(last, weights_only=True)["global_step"] == 3
