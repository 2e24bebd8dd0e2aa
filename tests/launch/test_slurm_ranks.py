"""SLURM environment variables, simulated in a subprocess, give the trainer the right ranks (built by the CLI, no fit)."""

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import CONFIGS, DEBUG_CONFIG, ROOT

# Task 3 of `srun` for `--nodes=2 --ntasks-per-node=2`: the second task of the second node.
SRUN_TASK_3 = {
    "SLURM_JOB_ID": "987654", "SLURM_JOB_NAME": "train", "SLURM_NTASKS": "4", "SLURM_NNODES": "2",
    "SLURM_NTASKS_PER_NODE": "2", "SLURM_TASKS_PER_NODE": "2(x2)", "SLURM_PROCID": "3", "SLURM_LOCALID": "1",
    "SLURM_NODEID": "1", "SLURM_STEP_ID": "0", "SLURM_NODELIST": "gpu[07-08]",
}

SCRIPT = r"""
import json, os, sys
from maskdiff.tools.lightning_cli import MaskDiffCLI

results = {}
for name, case in json.loads(sys.argv[1]).items():
    for key in [k for k in os.environ if k.startswith(("SLURM_", "MASTER_"))]:
        del os.environ[key]
    os.environ.update(case["env"])
    cli = MaskDiffCLI(args=case["args"], run=False)
    trainer, environment = cli.trainer, cli.trainer.strategy.cluster_environment
    results[name] = {
        "environment": type(environment).__name__,
        "ranks": [trainer.global_rank, trainer.local_rank, trainer.node_rank, trainer.world_size],
        "main_address": environment.main_address,
        "main_port": environment.main_port,
        "auto_requeue": getattr(environment, "auto_requeue", None),
        "requeue_signal": getattr(getattr(environment, "requeue_signal", None), "name", None),
    }
print("RESULTS " + json.dumps(results))
"""


@pytest.mark.slow
def test_srun_variables_give_the_ranks_with_the_slurm_overlay_and_by_detection(tmp_path):
    common = ["--config", str(DEBUG_CONFIG), "--trainer.accelerator", "cpu", "--trainer.devices", "2",
              "--trainer.num_nodes", "2", "--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path)]
    overlay = ["--config", str(CONFIGS / "trainer" / "slurm.yaml")]
    cases = {
        "overlay": {"env": SRUN_TASK_3, "args": [*common[:2], *overlay, *common[2:]]},
        "detected": {"env": SRUN_TASK_3, "args": [*common, "--trainer.strategy", "ddp"]},
        "interactive": {"env": {**SRUN_TASK_3, "SLURM_JOB_NAME": "interactive"},
                        "args": [*common, "--trainer.strategy", "ddp", "--trainer.num_nodes", "1"]},
    }
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_"))}
    env.update({"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    script = tmp_path / "ranks.py"
    script.write_text(SCRIPT)
    done = subprocess.run([sys.executable, str(script), json.dumps(cases)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    results = json.loads(done.stdout.split("RESULTS ", 1)[1])

    for name in ("overlay", "detected"):
        result = results[name]
        assert result["environment"] == "SLURMEnvironment", name
        assert result["ranks"] == [3, 1, 1, 4], name  # global rank, local rank, node rank, world size
        assert result["main_address"] == "gpu07"  # the first host of SLURM_NODELIST
        assert result["main_port"] == 15000 + 7654  # derived from the job id: the same on every node
    assert results["overlay"]["auto_requeue"] is True
    assert results["overlay"]["requeue_signal"] == "SIGUSR1"
    # A job named "interactive" is not treated as SLURM: Lightning launches its own processes from rank 0.
    assert results["interactive"]["environment"] == "LightningEnvironment"
    assert results["interactive"]["ranks"][:3] == [0, 0, 0]
