"""The SLURM job scripts are valid bash and ask for what the preflight checks: one srun task per GPU, requeue."""

import os
import re
import subprocess

import pytest

from maskdiff.tools.main import main
from tests.helpers import ROOT

SCRIPTS = sorted((ROOT / "examples" / "slurm").glob("*.sbatch"))


def test_both_job_scripts_exist():
    assert [path.name for path in SCRIPTS] == ["train.sbatch", "train_multinode.sbatch"]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda path: path.name)
def test_job_script_is_valid_and_launches_one_task_per_gpu(script):
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    options = dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(\S+))?", text, flags=re.MULTILINE))
    assert options["ntasks-per-node"] == options["gpus-per-node"]
    assert options["signal"].startswith("SIGUSR1@") and "requeue" in options
    assert "srun maskdiff preflight" in text and "srun maskdiff fit" in text
    assert "--config configs/trainer/slurm.yaml" in text and "--ckpt_path last" in text
    assert '--trainer.default_root_dir "$RUN_DIR"' in text and '--trainer.callbacks.dirpath "$RUN_DIR/checkpoints"' in text


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda path: path.name)
def test_job_script_runs_preflight_then_fit_with_arguments_the_preflight_accepts(script, tmp_path, monkeypatch, capsys):
    """Run the job script with a stand-in ``srun`` that records its command lines, then preflight those arguments."""
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "srun").write_text('#!/bin/bash\nprintf "%s\\0" "$@" >> "$SRUN_LOG"\nprintf "\\n" >> "$SRUN_LOG"\n')
    (fake_bin / "srun").chmod(0o755)
    slurm = {"SLURM_JOB_ID": "31337", "SLURM_JOB_NAME": "dit_debug", "SLURM_NNODES": "2", "SLURM_NTASKS": "4",
             "SLURM_NTASKS_PER_NODE": "2", "SLURM_TASKS_PER_NODE": "2(x2)", "SLURM_JOB_NODELIST": "cpu[1-2]"}
    env = {"PATH": f"{fake_bin}:/usr/bin:/bin", "SRUN_LOG": str(tmp_path / "srun.log"), **slurm}
    subprocess.run(["bash", str(script), "configs/dit/dit_debug_cpu.yaml", "--", "--trainer.accelerator", "cpu"],
                   cwd=ROOT, env=env, check=True, capture_output=True)
    commands = [line.strip("\0").split("\0") for line in (tmp_path / "srun.log").read_text().splitlines() if line]
    assert [command[:2] for command in commands] == [["maskdiff", "preflight"], ["maskdiff", "fit"]]
    assert commands[0][2:] == commands[1][2:]
    args = commands[0][2:]
    assert args[args.index("--trainer.default_root_dir") + 1] == "runs/dit_debug"
    assert args[-2:] == ["--trainer.accelerator", "cpu"]

    for name in [name for name in os.environ if name.startswith("SLURM_")]:
        monkeypatch.delenv(name)
    for name, value in {**slurm, "SLURM_PROCID": "0", "SLURM_STEP_ID": "0"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as exit_info:
        main(["preflight", *args])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0, out
    assert "maskdiff preflight OK: world size 4 = 2 node(s) x 2 device(s)" in out
