"""The preflight catches each config/environment mismatch that hangs or crashes a multi-node job, naming both values."""

import copy
import os

import pytest

from maskdiff.tools.main import main
from maskdiff.data.shards import write_manifest
from maskdiff.launch.preflight import (
    LaunchConfig,
    check_launch,
    requested_devices,
    tasks_per_node,
)
from tests.helpers import CONFIGS, DEBUG_CONFIG

# 2 nodes x 4 GPUs, rank 5 (node 1, local rank 1), as `srun` sets it for `--nodes=2 --ntasks-per-node=4`.
SLURM_ENV = {
    "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "dit", "SLURM_NTASKS": "8", "SLURM_NNODES": "2",
    "SLURM_NTASKS_PER_NODE": "4", "SLURM_TASKS_PER_NODE": "4(x2)", "SLURM_PROCID": "5", "SLURM_LOCALID": "1",
    "SLURM_NODEID": "1", "SLURM_STEP_ID": "0", "SLURM_GPUS_ON_NODE": "4", "CUDA_VISIBLE_DEVICES": "0,1,2,3",
}


def write_shards(folder, count, samples_per_shard=10):
    """``count`` (empty) shard files with a manifest listing their sample counts; returns the brace pattern."""
    folder.mkdir(parents=True, exist_ok=True)
    names = [f"part-{i:06d}.tar" for i in range(count)]
    for name in names:
        (folder / name).write_bytes(b"")
    entries = [{"path": name, "samples": samples_per_shard} for name in names]
    write_manifest(folder / "manifest.json", {"shards": entries, "total": count * samples_per_shard})
    return str(folder / f"part-{{000000..{count - 1:06d}}}.tar")


@pytest.fixture
def consistent(tmp_path):
    """A parsed fit config that fits SLURM_ENV: 2 nodes x 4 GPUs, 16 train and val shards for 8 ranks x 2 workers."""
    return {
        "trainer": {
            "accelerator": "gpu", "devices": 4, "num_nodes": 2, "strategy": "ddp",
            "default_root_dir": str(tmp_path / "run"),
            "plugins": [{"class_path": "lightning.fabric.plugins.environments.SLURMEnvironment",
                         "init_args": {"auto_requeue": True}}],
            "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                           "init_args": {"dirpath": str(tmp_path / "run" / "checkpoints"), "save_last": True}}],
            "logger": None,
        },
        "data": {"class_path": "maskdiff.data.ImageShardsDataModule", "init_args": {
            "train_shards": write_shards(tmp_path / "train", 16), "val_shards": write_shards(tmp_path / "val", 16),
            "batch_size": 4, "num_workers": 2,
        }},
        "ckpt_path": "last",
    }


def findings_of(config, env, launching=True):
    return check_launch(LaunchConfig.from_config(config), env, cuda_device_count=None, launching=launching)


def test_a_consistent_launch_passes(consistent):
    assert findings_of(consistent, SLURM_ENV) == []


def _set(config, dotted, value):
    *parents, last = dotted.split(".")
    node = config
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    if value is DELETE:
        del node[last]
    else:
        node[last] = value


DELETE = object()

MISMATCHES = {
    # name: (environment changes, config changes, expected check, words the message must contain)
    "tasks per node vs devices": (
        {"SLURM_NTASKS_PER_NODE": "8", "SLURM_TASKS_PER_NODE": "8(x2)", "SLURM_NTASKS": "16"}, {},
        "tasks-per-node", ["SLURM_NTASKS_PER_NODE=8", "trainer.devices=4"]),
    "uneven --ntasks placement": (
        {"SLURM_NTASKS_PER_NODE": DELETE, "SLURM_TASKS_PER_NODE": "5,3"}, {},
        "tasks-per-node", ["SLURM_TASKS_PER_NODE=5,3", "trainer.devices=4"]),
    "--ntasks without --ntasks-per-node": (
        {"SLURM_NTASKS_PER_NODE": DELETE}, {}, "ntasks-per-node", ["SLURM_NTASKS=8", "--ntasks-per-node=4"]),
    "nodes vs num_nodes": (
        {"SLURM_NNODES": "4", "SLURM_TASKS_PER_NODE": "4(x4)", "SLURM_NTASKS": "16"}, {},
        "num-nodes", ["SLURM_NNODES=4", "trainer.num_nodes=2"]),
    "tasks vs nodes x devices": (
        {"SLURM_NTASKS": "6"}, {}, "world-size", ["SLURM_NTASKS=6", "2 x 4 = 8"]),
    "one GPU bound per task": (
        {"CUDA_VISIBLE_DEVICES": "0"}, {}, "gpus", ["1 GPU(s)", "CUDA_VISIBLE_DEVICES='0'", "trainer.devices=4"]),
    "fewer GPUs on the node": (
        {"SLURM_GPUS_ON_NODE": "2", "CUDA_VISIBLE_DEVICES": "0,1"}, {}, "gpus", ["SLURM_GPUS_ON_NODE=2", "trainer.devices=4"]),
    "sbatch without --ntasks-per-node (SLURM_NTASKS=1)": (
        {"SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": DELETE, "SLURM_TASKS_PER_NODE": DELETE}, {},
        "srun", ["SLURM_NTASKS=1", "2 x 4 = 8"]),
    "batch script without srun": (
        {"SLURM_STEP_ID": DELETE}, {}, "srun", ["SLURM_NTASKS=8", "SLURM_STEP_ID=unset", "srun"]),
    "multi-node without srun tasks": (
        {"SLURM_NTASKS": DELETE, "SLURM_NTASKS_PER_NODE": DELETE, "SLURM_TASKS_PER_NODE": DELETE},
        {"trainer.plugins": []}, "srun", ["SLURM_NTASKS is not set", "trainer.num_nodes=2"]),
    "interactive job name with the SLURM plugin": (
        {"SLURM_JOB_NAME": "bash"}, {}, "interactive", ["SLURM_JOB_NAME=bash", "SLURMEnvironment"]),
    "interactive job name on two nodes": (
        {"SLURM_JOB_NAME": "interactive"}, {"trainer.plugins": []}, "interactive",
        ["SLURM_JOB_NAME=interactive", "trainer.num_nodes=2"]),
    "missing training shards": (
        {}, {"data.init_args.train_shards": "{tmp}/train/part-{{000000..000019}}.tar"},
        "shards", ["4 of 20 shard(s) missing", "part-000016.tar"]),
    "pattern expanding to nothing": ({}, {"data.init_args.val_shards": "::"}, "shards", ["val_shards", "no shards"]),
    "evaluation split too small for the ranks": (
        {}, {"data.init_args.val_samples": 6}, "eval-split", ["val_samples=6", "world_size=8"]),
    "ckpt_path names a missing file": (
        {}, {"ckpt_path": "{tmp}/nope.ckpt"}, "ckpt-path", ["nope.ckpt does not exist"]),
    "ckpt_path hpc before any requeue": ({}, {"ckpt_path": "hpc"}, "ckpt-path", ["no hpc_ckpt_*.ckpt", "--ckpt_path last"]),
    "ckpt_path last without save_last": (
        {}, {"trainer.callbacks.0.init_args.save_last": False}, "resume", ["save_last"]),
    "ckpt_path last with checkpoints in the logger's version directory": (
        {}, {"trainer.callbacks.0.init_args.dirpath": None}, "resume", ["version_N", "dirpath"]),
    "SLURM plugin outside an srun task": (
        {"SLURM_NTASKS": DELETE, "SLURM_JOB_ID": DELETE}, {}, "slurm-plugin", ["SLURMEnvironment", "SLURM_NTASKS"]),
}


@pytest.mark.parametrize("name", list(MISMATCHES))
def test_each_mismatch_is_an_error_naming_both_values(name, consistent, tmp_path):
    env_changes, config_changes, check, words = MISMATCHES[name]
    env = {k: v for k, v in {**SLURM_ENV, **env_changes}.items() if v is not DELETE}
    config = copy.deepcopy(consistent)
    for key, value in config_changes.items():
        _set(config, key, value.format(tmp=tmp_path) if isinstance(value, str) else value)
    findings = findings_of(config, env)
    matching = [f for f in findings if f.check == check and f.severity == "error"]
    assert matching, f"{name}: expected an error [{check}], got {[str(f) for f in findings]}"
    for word in words:
        assert any(word in f.message for f in matching), f"{name}: {word!r} not in {[f.message for f in matching]}"


WARNINGS = {
    "fewer training shards than readers": (
        {}, {"data.init_args.num_workers": 4}, "shards", ["16 training shard(s) for 32 readers"]),
    "GPUs left idle": ({"SLURM_GPUS_ON_NODE": "8", "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"}, {}, "gpus", ["4 GPU(s)"]),
    "interactive job on one node": (
        {"SLURM_JOB_NAME": "bash", "SLURM_NTASKS": "1", "SLURM_NNODES": "1", "SLURM_NTASKS_PER_NODE": "1"},
        {"trainer.plugins": [], "trainer.num_nodes": 1}, "interactive", ["ignores SLURM"]),
    "requeued without ckpt_path": ({"SLURM_RESTART_COUNT": "2"}, {"ckpt_path": None}, "resume", ["SLURM_RESTART_COUNT=2"]),
}


@pytest.mark.parametrize("name", list(WARNINGS))
def test_warnings_do_not_stop_the_run(name, consistent):
    env_changes, config_changes, check, words = WARNINGS[name]
    env = {**SLURM_ENV, **env_changes}
    config = copy.deepcopy(consistent)
    for key, value in config_changes.items():
        _set(config, key, value)
    findings = findings_of(config, env)
    assert {f.severity for f in findings} == {"warning"}, [str(f) for f in findings]
    assert any(f.check == check and all(word in f.message for word in words) for f in findings), [str(f) for f in findings]


def test_a_login_node_skips_slurm_and_gpu_checks_but_checks_the_files(consistent):
    config = copy.deepcopy(consistent)
    config["ckpt_path"] = "/no/such.ckpt"
    findings = findings_of(config, {"CUDA_VISIBLE_DEVICES": ""}, launching=False)
    assert {(f.check, f.severity) for f in findings} == {
        ("slurm-plugin", "warning"), ("gpus", "warning"), ("ckpt-path", "error")}


def test_slurm_task_and_device_counts_are_parsed():
    assert tasks_per_node({"SLURM_TASKS_PER_NODE": "8(x3),4"}) == [8, 8, 8, 4]
    assert tasks_per_node({"SLURM_NTASKS_PER_NODE": "2", "SLURM_TASKS_PER_NODE": "2(x2)"}) == [2]
    assert tasks_per_node({}) is None
    with pytest.raises(ValueError, match="SLURM_TASKS_PER_NODE='eight'"):
        tasks_per_node({"SLURM_TASKS_PER_NODE": "eight"})
    assert requested_devices("auto", "gpu", 8) == 8 and requested_devices(-1, "cuda", 4) == 4
    assert requested_devices("0,1,3", "gpu", 8) == 3 and requested_devices([0, 1], "gpu", 8) == 2
    assert requested_devices("auto", "cpu", 0) == 1 and requested_devices("2", "cpu", 0) == 2
    with pytest.raises(ValueError, match="trainer.devices=0"):
        requested_devices(0, "gpu", 8)


def _slurm_env(monkeypatch, env):
    for name in [name for name in os.environ if name.startswith("SLURM_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)


def test_fit_inside_slurm_stops_with_exit_code_2_before_building_anything(tmp_path, monkeypatch, capsys):
    _slurm_env(monkeypatch, {**SLURM_ENV, "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0"})
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(DEBUG_CONFIG), "--config", str(CONFIGS / "trainer" / "slurm.yaml"),
              "--trainer.devices", "8", "--ckpt_path", "last", "--trainer.default_root_dir", str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "maskdiff preflight FAILED" in err
    assert "SLURM_NTASKS_PER_NODE=4 but trainer.devices=8" in err
    assert "SLURM_NNODES=2 but trainer.num_nodes=1" in err


def test_the_preflight_tool_passes_a_consistent_launch(tmp_path, monkeypatch, capsys):
    _slurm_env(monkeypatch, {**SLURM_ENV, "SLURM_PROCID": "0"})
    args = ["preflight", "--config", str(DEBUG_CONFIG), "--config", str(CONFIGS / "trainer" / "slurm.yaml"),
            "--trainer.accelerator", "cpu", "--trainer.devices", "4", "--trainer.num_nodes", "2",
            "--trainer.default_root_dir", str(tmp_path), "--trainer.callbacks.dirpath", str(tmp_path / "checkpoints"),
            "--ckpt_path", "last"]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 0, capsys.readouterr()
    assert "maskdiff preflight OK: world size 8 = 2 node(s) x 4 device(s); 0 error(s), 0 warning(s)" in capsys.readouterr().out
    monkeypatch.setenv("SLURM_NNODES", "3")
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    assert "error [num-nodes]: SLURM_NNODES=3 but trainer.num_nodes=2" in capsys.readouterr().out
