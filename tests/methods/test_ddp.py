"""A real 2-process DDP run on the CPU (gloo), launched the way users launch it: ``maskdiff fit``."""

import os
import subprocess
import sys

import pytest
import torch

from tests.helpers import ROOT, config_in


@pytest.mark.slow
def test_two_process_ddp_trains(tmp_path, digits_cache):
    config, ckpt_dir = config_in(tmp_path)
    command = [
        sys.executable, "-m", "maskdiff.tools.main", "fit", "--config", str(config),
        "--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.max_steps", "6",
        "--trainer.limit_val_batches", "2",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in result.stderr + result.stdout
    checkpoint = torch.load(ckpt_dir / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 6
    state = checkpoint["state_dict"]
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    assert not torch.equal(state["backbone.final_layer.linear.weight"], torch.zeros_like(state["backbone.final_layer.linear.weight"]))
