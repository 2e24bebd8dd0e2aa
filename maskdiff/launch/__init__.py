"""Launching training on clusters: preflight checks of a config against SLURM/CUDA, and resuming requeued jobs."""

from maskdiff.launch.preflight import Finding, LaunchConfig, check_launch, run_preflight
from maskdiff.launch.resume import newest_resume_checkpoint

__all__ = ["Finding", "LaunchConfig", "check_launch", "newest_resume_checkpoint", "run_preflight"]
