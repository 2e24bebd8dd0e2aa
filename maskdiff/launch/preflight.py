"""Preflight of a training launch: the config/environment mismatches that hang or crash multi-node jobs.

A distributed job that starts with the wrong number of processes does not fail: it waits, often until the time
limit, in "Initializing distributed". :func:`check_launch` compares what a parsed ``fit`` config asks for
(``trainer.devices``, ``trainer.num_nodes``, accelerator, data shards, ``ckpt_path``, checkpoint directory, writable
run, checkpoint and log directories) with what SLURM and CUDA actually gave the process, and returns every problem at
once as :class:`Finding` s: errors stop the run before any model is built (exit code 2), warnings are printed and the
run goes on.

Lightning reads ranks from ``SLURM_PROCID``/``SLURM_LOCALID``/``SLURM_NODEID`` and the world size from
``SLURM_NTASKS`` whenever ``SLURM_NTASKS`` is set and the job name is not ``bash``/``interactive``
(``SLURMEnvironment.detect``), or always when ``trainer.plugins`` names ``SLURMEnvironment``.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TextIO

from maskdiff.data.shards import expand_urls, lookup_shard_counts, missing_local_shards
from maskdiff.data.streams import eval_batch_plan
from maskdiff.launch.directories import run_directories, unwritable_directories

NAMED_CHECKPOINTS = ("last", "best", "hpc", "registry")
INTERACTIVE_JOB_NAMES = ("bash", "interactive")
GPU_ACCELERATORS = ("gpu", "cuda")


@dataclass(frozen=True)
class Finding:
    """One problem of a launch: ``check`` names the rule, ``message`` names the values that disagree."""

    severity: Literal["error", "warning"]
    check: str
    message: str

    def __str__(self) -> str:
        return f"{self.severity} [{self.check}]: {self.message}"


@dataclass(frozen=True)
class CheckpointSetup:
    """A ``ModelCheckpoint`` of ``trainer.callbacks``: its directory (``None``: chosen by Lightning) and ``save_last``."""

    dirpath: str | None
    save_last: bool


@dataclass(frozen=True)
class LaunchConfig:
    """What a ``fit`` config asks of the launcher; build it with :meth:`from_config`."""

    accelerator: str = "auto"
    devices: int | str | Sequence[int] = "auto"
    num_nodes: int = 1
    slurm_plugin: bool = False
    ckpt_path: str | None = None
    default_root_dir: str | None = None
    checkpoints: tuple[CheckpointSetup, ...] = ()
    versioned_logger: bool = True
    data: Mapping[str, Any] = field(default_factory=dict)
    directories: tuple[tuple[str, str], ...] = ()

    @classmethod
    def from_config(cls, config: Any) -> LaunchConfig:
        """From the parsed config of the ``fit`` subcommand (a jsonargparse ``Namespace`` or a plain dict)."""
        config = config.as_dict() if hasattr(config, "as_dict") else dict(config)
        trainer = config.get("trainer") or {}
        plugins = trainer.get("plugins") or []
        plugins = plugins if isinstance(plugins, list) else [plugins]
        callbacks = trainer.get("callbacks") or []
        callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
        checkpoints = tuple(
            CheckpointSetup(dirpath=_init_args(c).get("dirpath"), save_last=bool(_init_args(c).get("save_last")))
            for c in callbacks
            if _class_name(c) == "ModelCheckpoint"
        )
        data = config.get("data") or {}
        return cls(
            accelerator=str(trainer.get("accelerator") or "auto"),
            devices=trainer.get("devices") if trainer.get("devices") is not None else "auto",
            num_nodes=int(trainer.get("num_nodes") or 1),
            slurm_plugin=any(_class_name(p) == "SLURMEnvironment" for p in plugins),
            ckpt_path=None if config.get("ckpt_path") is None else str(config["ckpt_path"]),
            default_root_dir=None if trainer.get("default_root_dir") is None else str(trainer["default_root_dir"]),
            checkpoints=checkpoints,
            versioned_logger=_logger_is_versioned(trainer.get("logger")),
            data=_init_args(data) if isinstance(data, Mapping) else {},
            directories=tuple(run_directories(config)),
        )


def _class_name(component: Any) -> str:
    if isinstance(component, Mapping):
        component = component.get("class_path", "")
    if not isinstance(component, str):
        component = type(component).__name__
    return component.rsplit(".", 1)[-1]


def _init_args(component: Any) -> Mapping[str, Any]:
    return (component.get("init_args") or {}) if isinstance(component, Mapping) else {}


def _logger_is_versioned(logger: Any) -> bool:
    """True when a logger directory gets a new ``version_N`` per run (Lightning's default logger included)."""
    if logger is False:
        return False
    loggers = logger if isinstance(logger, list) else [logger]
    if not loggers:
        return False
    first = loggers[0]
    return not (isinstance(first, Mapping) and _init_args(first).get("version") is not None)


# ------------------------------------------------------------------------------------------------- environment
def tasks_per_node(env: Mapping[str, str]) -> list[int] | None:
    """Tasks on each node: ``SLURM_NTASKS_PER_NODE`` (one value) or ``SLURM_TASKS_PER_NODE`` (``"8(x2),4"``)."""
    if env.get("SLURM_NTASKS_PER_NODE"):
        return [int(env["SLURM_NTASKS_PER_NODE"])]
    spec = env.get("SLURM_TASKS_PER_NODE")
    if not spec:
        return None
    counts = []
    for part in spec.split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if match is None:
            raise ValueError(f"SLURM_TASKS_PER_NODE={spec!r} is not of the form '8(x2),4'")
        counts += [int(match.group(1))] * int(match.group(2) or 1)
    return counts


def visible_gpus(env: Mapping[str, str], cuda_device_count: int | None = None) -> int | None:
    """GPUs this process may use: the entries of ``CUDA_VISIBLE_DEVICES`` when set, else ``cuda_device_count``."""
    if "CUDA_VISIBLE_DEVICES" in env:
        entries = [e for e in env["CUDA_VISIBLE_DEVICES"].split(",") if e.strip() not in ("", "NoDevFiles", "-1")]
        return len(entries)
    return cuda_device_count


def requested_devices(devices: int | str | Sequence[int], accelerator: str, gpus: int | None) -> int | None:
    """Processes per node that ``trainer.devices`` means (``-1``/``"auto"``: every visible GPU); ``None``: unknown."""
    if isinstance(devices, str):
        text = devices.strip()
        if text in ("auto", "-1"):
            uses_gpus = accelerator in GPU_ACCELERATORS or (accelerator == "auto" and bool(gpus))
            return gpus if uses_gpus else (1 if text == "auto" else None)
        if "," in text:
            return len([d for d in text.split(",") if d.strip()])
        devices = int(text)
    if isinstance(devices, Sequence):
        return len(devices)
    if devices == -1:
        return requested_devices("-1", accelerator, gpus)
    if devices < 1:
        raise ValueError(f"trainer.devices={devices!r}: expected a positive count, a list of device ids, -1 or 'auto'")
    return int(devices)


def _int_env(env: Mapping[str, str], name: str) -> int | None:
    value = env.get(name)
    if value is None or value.strip() == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not an integer") from None


def is_rank_zero(env: Mapping[str, str]) -> bool:
    return env.get("SLURM_PROCID", env.get("RANK", "0")) == "0"


# ------------------------------------------------------------------------------------------------- checks
def check_launch(
    launch: LaunchConfig, env: Mapping[str, str], cuda_device_count: int | None = None, launching: bool = True
) -> list[Finding]:
    """Every mismatch between ``launch`` and the environment ``env``; see the module docstring.

    Args:
        launch: what the config asks for.
        env: the process environment (``os.environ``).
        cuda_device_count: GPUs torch sees when ``CUDA_VISIBLE_DEVICES`` is unset (``None``: unknown).
        launching: ``True`` right before ``fit`` (a SLURM plugin outside a SLURM task is then an error);
            ``False`` for the ``maskdiff preflight`` tool, which may run on a login node.
    """
    gpus = visible_gpus(env, cuda_device_count)
    devices = requested_devices(launch.devices, launch.accelerator, gpus)
    findings = _check_slurm(launch, env, devices, launching)
    findings += _check_gpus(launch, env, devices, gpus, launching)
    world_size = launch.num_nodes * devices if devices is not None else None
    findings += _check_shards(launch.data, world_size)
    findings += _check_resume(launch, env)
    findings += [Finding("error", "writable", problem) for problem in unwritable_directories(launch.directories)]
    return findings


def _check_slurm(launch: LaunchConfig, env: Mapping[str, str], devices: int | None, launching: bool) -> list[Finding]:
    findings: list[Finding] = []
    in_job = "SLURM_JOB_ID" in env
    job_name = env.get("SLURM_JOB_NAME")
    interactive = job_name in INTERACTIVE_JOB_NAMES
    ntasks = _int_env(env, "SLURM_NTASKS")
    world = launch.num_nodes * devices if devices is not None else None
    slurm_ranks = launch.slurm_plugin or (ntasks is not None and not interactive)

    if launch.slurm_plugin and ntasks is None:
        findings.append(Finding(
            "error" if launching else "warning", "slurm-plugin",
            "trainer.plugins has SLURMEnvironment, which takes ranks from srun's SLURM_* variables, but SLURM_NTASKS "
            "is not set (not an srun task): launch with srun inside an sbatch/salloc job"
            + ("" if launching else "; SLURM checks skipped"),
        ))
        return findings
    if not in_job:
        return findings

    if interactive:
        if launch.slurm_plugin:
            findings.append(Finding(
                "error", "interactive",
                f"SLURM_JOB_NAME={job_name}: Lightning treats this job as interactive and ignores SLURM, but "
                "trainer.plugins forces SLURMEnvironment; drop the plugin (configs/trainer/slurm.yaml) for interactive "
                "runs, or submit with another --job-name",
            ))
        elif launch.num_nodes > 1 or (ntasks or 1) > 1:
            findings.append(Finding(
                "error", "interactive",
                f"SLURM_JOB_NAME={job_name}: Lightning ignores SLURM for jobs named bash/interactive and launches "
                f"trainer.devices processes itself on this node, but trainer.num_nodes={launch.num_nodes} and "
                f"SLURM_NTASKS={ntasks}; submit with --job-name set to anything else (and srun)",
            ))
        else:
            findings.append(Finding(
                "warning", "interactive",
                f"SLURM_JOB_NAME={job_name}: Lightning ignores SLURM here (no SLURM ranks, no auto-requeue) and "
                "launches its own processes on this node",
            ))
        return findings

    if world is not None and world > 1:
        step = env.get("SLURM_STEP_ID", env.get("SLURM_STEPID", ""))
        if ntasks is None:
            findings.append(Finding(
                "error" if launch.num_nodes > 1 else "warning", "srun",
                f"SLURM_JOB_ID={env['SLURM_JOB_ID']} but SLURM_NTASKS is not set: not launched by srun with "
                f"--ntasks-per-node, so Lightning starts {devices} processes itself on one node"
                + (f" and trainer.num_nodes={launch.num_nodes} can never gather (hang)" if launch.num_nodes > 1
                   else " (works on one node, without SLURM's auto-requeue)")
                + f"; use #SBATCH --ntasks-per-node={devices} and srun maskdiff fit ...",
            ))
        elif ntasks == 1:
            findings.append(Finding(
                "error", "srun",
                f"SLURM_NTASKS=1 but trainer.num_nodes x trainer.devices = {launch.num_nodes} x {devices} = {world} "
                f"processes: the job was submitted without --ntasks-per-node={devices} or the command is not run "
                "through srun, and DDP waits for processes that never start; "
                f"use #SBATCH --ntasks-per-node={devices} and srun maskdiff fit ...",
            ))
        elif not step.isdigit():
            findings.append(Finding(
                "error", "srun",
                f"SLURM_NTASKS={ntasks} but this process is not an srun task (SLURM_STEP_ID={step or 'unset'}): the "
                "batch script runs once, so the other ranks never start; prefix the command with srun",
            ))
    if not slurm_ranks:
        return findings

    if ntasks is not None and ntasks > 1 and not env.get("SLURM_NTASKS_PER_NODE"):
        findings.append(Finding(
            "error", "ntasks-per-node",
            f"SLURM_NTASKS={ntasks} without SLURM_NTASKS_PER_NODE: Lightning refuses --ntasks; "
            f"use --ntasks-per-node={devices if devices is not None else 'DEVICES'} with --nodes={launch.num_nodes}",
        ))
    per_node = tasks_per_node(env)
    if per_node is not None and devices is not None and any(count != devices for count in per_node):
        source = "SLURM_NTASKS_PER_NODE" if env.get("SLURM_NTASKS_PER_NODE") else "SLURM_TASKS_PER_NODE"
        findings.append(Finding(
            "error", "tasks-per-node",
            f"{source}={env.get(source)} but trainer.devices={devices}: Lightning runs one process per device, one "
            f"SLURM task each; set #SBATCH --ntasks-per-node={devices} or --trainer.devices {per_node[0]}",
        ))
    nodes = _int_env(env, "SLURM_NNODES") or _int_env(env, "SLURM_JOB_NUM_NODES")
    if nodes is not None and nodes != launch.num_nodes:
        findings.append(Finding(
            "error", "num-nodes",
            f"SLURM_NNODES={nodes} but trainer.num_nodes={launch.num_nodes}; "
            f"set --trainer.num_nodes {nodes} or #SBATCH --nodes={launch.num_nodes}",
        ))
    if ntasks is not None and world is not None and ntasks != world and ntasks > 1:
        findings.append(Finding(
            "error", "world-size",
            f"SLURM_NTASKS={ntasks} but trainer.num_nodes x trainer.devices = {launch.num_nodes} x {devices} = "
            f"{world}: the process group never fills (hang) or ranks overflow it",
        ))
    return findings


def _check_gpus(
    launch: LaunchConfig, env: Mapping[str, str], devices: int | None, gpus: int | None, launching: bool
) -> list[Finding]:
    uses_gpus = launch.accelerator in GPU_ACCELERATORS or (launch.accelerator == "auto" and bool(gpus))
    if not uses_gpus or devices is None:
        return []
    if not launching and gpus == 0 and "SLURM_JOB_ID" not in env:
        return [Finding(
            "warning", "gpus",
            "no GPU visible to this process (a login node?): GPU checks skipped; run the preflight where the job "
            "runs: srun maskdiff preflight ...",
        )]
    findings = []
    if gpus is not None and gpus < devices:
        shown = f"CUDA_VISIBLE_DEVICES={env['CUDA_VISIBLE_DEVICES']!r}" if "CUDA_VISIBLE_DEVICES" in env else "torch"
        findings.append(Finding(
            "error", "gpus",
            f"this process sees {gpus} GPU(s) ({shown}) but trainer.devices={devices}: each rank picks GPU "
            f"SLURM_LOCALID among the GPUs it sees; request --gpus-per-node={devices} and do not bind one GPU per "
            "task (--gpus-per-task/--gpu-bind), or lower trainer.devices",
        ))
    on_node = _int_env(env, "SLURM_GPUS_ON_NODE")
    if on_node is not None and on_node < devices:
        findings.append(Finding(
            "error", "gpus",
            f"SLURM_GPUS_ON_NODE={on_node} but trainer.devices={devices}: request #SBATCH --gpus-per-node={devices}",
        ))
    elif on_node is not None and on_node > devices:
        findings.append(Finding(
            "warning", "gpus",
            f"SLURM_GPUS_ON_NODE={on_node} but trainer.devices={devices}: {on_node - devices} GPU(s) per node stay idle",
        ))
    return findings


def _check_shards(data: Mapping[str, Any], world_size: int | None) -> list[Finding]:
    """Shard checks consistent with :class:`maskdiff.data.ShardsDataModule` (its ``setup`` repeats them per rank)."""
    findings: list[Finding] = []
    ranks = world_size or 1
    workers = max(int(data.get("num_workers") or 0), 1)
    readers = ranks * workers
    for key in ("train_shards", "val_shards"):
        pattern = data.get(key)
        if not pattern:
            continue
        try:
            urls = expand_urls(pattern)
        except ValueError as error:
            findings.append(Finding("error", "shards", f"data {key}: {error}"))
            continue
        missing = missing_local_shards(urls)
        if missing:
            findings.append(Finding(
                "error", "shards",
                f"data {key}={pattern!r}: {len(missing)} of {len(urls)} shard(s) missing, e.g. {missing[0]}",
            ))
            continue
        if key == "train_shards" and len(urls) < readers:
            findings.append(Finding(
                "warning", "shards",
                f"{len(urls)} training shard(s) for {readers} readers ({ranks} ranks x {workers} workers): training "
                f"resamples shards, so this runs, but readers repeat the same shards; write at least {readers} shards",
            ))
        if key == "val_shards":
            findings += _check_eval_split(data, urls, ranks, readers)
    return findings


def _check_eval_split(data: Mapping[str, Any], urls: Sequence[str], ranks: int, readers: int) -> list[Finding]:
    counts = lookup_shard_counts(urls)
    total = data.get("val_samples") or (sum(counts) if counts is not None else None)
    batch_size = data.get("val_batch_size") or data.get("batch_size") or 1
    findings = []
    if total is not None:
        try:
            eval_batch_plan(int(total), ranks, 0, int(batch_size))
        except ValueError as error:
            findings.append(Finding("error", "eval-split", f"data val_shards: {error}"))
    if len(urls) < readers:
        findings.append(Finding(
            "warning", "shards",
            f"{len(urls)} val shard(s) for {readers} readers ({ranks} ranks x {readers // ranks} workers): every rank "
            "still gets equal batches, but readers share shards, each scanning from a shard's start to its samples",
        ))
    return findings


def _check_resume(launch: LaunchConfig, env: Mapping[str, str]) -> list[Finding]:
    ckpt = launch.ckpt_path
    root = launch.default_root_dir or os.getcwd()
    findings: list[Finding] = []
    if ckpt is not None and ckpt not in NAMED_CHECKPOINTS and not Path(ckpt).is_file():
        findings.append(Finding(
            "error", "ckpt-path",
            f"--ckpt_path {ckpt} does not exist (expected an existing file or one of {NAMED_CHECKPOINTS})",
        ))
    elif ckpt == "hpc" and not any(Path(root).glob("hpc_ckpt_*.ckpt")):
        findings.append(Finding(
            "error", "ckpt-path",
            f"--ckpt_path hpc but no hpc_ckpt_*.ckpt in trainer.default_root_dir={root}: Lightning raises on a first "
            "run; use --ckpt_path last (maskdiff resumes from the newest of last.ckpt and hpc_ckpt_*.ckpt)",
        ))
    elif ckpt == "last":
        saving_last = [c for c in launch.checkpoints if c.save_last]
        if not saving_last:
            findings.append(Finding(
                "error", "resume",
                "--ckpt_path last but no ModelCheckpoint in trainer.callbacks has save_last: true, so a requeued job "
                "never finds a checkpoint and restarts from step 0",
            ))
        elif all(c.dirpath is None for c in saving_last) and launch.versioned_logger:
            findings.append(Finding(
                "error", "resume",
                "--ckpt_path last but the ModelCheckpoint has no dirpath: checkpoints go to the logger's version_N "
                "directory, which is new at every start, so a requeued job finds no last.ckpt; set the ModelCheckpoint "
                f"dirpath to a fixed directory (e.g. {root}/checkpoints)",
            ))
    restarts = _int_env(env, "SLURM_RESTART_COUNT")
    if ckpt is None and restarts:
        findings.append(Finding(
            "warning", "resume",
            f"SLURM_RESTART_COUNT={restarts}: this job was requeued but --ckpt_path is not set, so training restarts "
            "from step 0 unless an hpc_ckpt_*.ckpt is in trainer.default_root_dir; pass --ckpt_path last",
        ))
    return findings


# ------------------------------------------------------------------------------------------------- reporting
def describe_world(launch: LaunchConfig, env: Mapping[str, str], cuda_device_count: int | None = None) -> str:
    gpus = visible_gpus(env, cuda_device_count)
    devices = requested_devices(launch.devices, launch.accelerator, gpus)
    world = "?" if devices is None else launch.num_nodes * devices
    return f"world size {world} = {launch.num_nodes} node(s) x {devices if devices is not None else '?'} device(s)"


def report(findings: Sequence[Finding], summary: str, stream: TextIO | None = None) -> None:
    """Print ``summary`` with the count of errors and warnings, then every finding, one per line."""
    stream = stream or sys.stderr
    errors = sum(f.severity == "error" for f in findings)
    warnings = len(findings) - errors
    verdict = "FAILED" if errors else "OK"
    print(f"maskdiff preflight {verdict}: {summary}; {errors} error(s), {warnings} warning(s)", file=stream)
    for finding in sorted(findings, key=lambda f: f.severity != "error"):
        print(f"  {finding}", file=stream)
    stream.flush()


def run_preflight(
    config: Any, env: Mapping[str, str] | None = None, launching: bool = True, stream: TextIO | None = None
) -> list[Finding]:
    """Check a parsed ``fit`` config against ``env`` (default ``os.environ``), print the result and return it.

    Rank 0 prints the full report; other ranks print only when they find an error (a problem of one node only).
    """
    env = os.environ if env is None else env
    launch = LaunchConfig.from_config(config)
    cuda_count = None
    if "CUDA_VISIBLE_DEVICES" not in env and (launch.accelerator in GPU_ACCELERATORS or launch.accelerator == "auto"):
        import torch

        cuda_count = torch.cuda.device_count()
    findings = check_launch(launch, env, cuda_count, launching=launching)
    has_errors = any(f.severity == "error" for f in findings)
    if is_rank_zero(env) or has_errors:
        rank = "" if is_rank_zero(env) else f" (rank {env.get('SLURM_PROCID', env.get('RANK'))})"
        report(findings, describe_world(launch, env, cuda_count) + rank, stream)
    return findings
