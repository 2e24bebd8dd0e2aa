"""``fit --ckpt_path last`` resumes from the newest of ``last.ckpt`` and SLURM's ``hpc_ckpt_<N>.ckpt``."""

import os
import shutil

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from maskdiff.tools.main import main
from maskdiff.launch.resume import newest_resume_checkpoint
from tests.helpers import config_in


def _touch(path, mtime):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    os.utime(path, (mtime, mtime))


def test_the_newest_of_last_and_hpc_checkpoints_is_chosen(tmp_path):
    ckpt_dir = tmp_path / "checkpoints"
    trainer = L.Trainer(default_root_dir=tmp_path, callbacks=[ModelCheckpoint(dirpath=ckpt_dir, save_last=True)],
                        logger=False, accelerator="cpu")
    assert newest_resume_checkpoint(trainer) is None
    _touch(ckpt_dir / "last.ckpt", 1000)
    _touch(ckpt_dir / "step00000100.ckpt", 3000)  # a periodic checkpoint is not a resume candidate
    _touch(tmp_path / "hpc_ckpt_1.ckpt", 2000)
    assert newest_resume_checkpoint(trainer) == tmp_path / "hpc_ckpt_1.ckpt"
    _touch(ckpt_dir / "last-v1.ckpt", 4000)
    assert newest_resume_checkpoint(trainer) == ckpt_dir / "last-v1.ckpt"

    lightning_decides = L.Trainer(default_root_dir=tmp_path, callbacks=[ModelCheckpoint(save_last=True)],
                                  logger=False, accelerator="cpu")
    assert newest_resume_checkpoint(lightning_decides) is None  # dirpath from the logger: Lightning's own lookup


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
