"""``maskdiff preflight``: check a ``fit`` command line against SLURM and CUDA without building anything.

The checks are :mod:`maskdiff.launch.preflight`'s; ``maskdiff fit`` runs them itself inside a SLURM job.
"""

from __future__ import annotations

import warnings

from maskdiff.tools.lightning_cli import PreflightCLI

USAGE = """usage: maskdiff preflight [the options of maskdiff fit]

Check a fit command line against SLURM and CUDA (processes, GPUs, shards, resuming) without building anything;
exit 0 when there is no error, 2 otherwise. Run it where the job runs (srun maskdiff preflight ...):

    maskdiff preflight --config configs/dit/dit_xl2_imagenet256.yaml --config configs/trainer/slurm.yaml --ckpt_path last

The options, as for maskdiff fit:
"""


def preflight(args: list[str], exit_on_error: bool = True) -> None:
    """Parse ``args`` as ``maskdiff fit`` would, print every launch problem, exit 0 (no errors) or 2
    (``exit_on_error=False``: a command line that does not parse raises jsonargparse's ``ArgumentError``).

        maskdiff preflight --config configs/dit/dit_xl2_imagenet256.yaml --config configs/trainer/slurm.yaml --ckpt_path last
    """
    if "-h" in args or "--help" in args:
        print(USAGE)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        PreflightCLI(args=["fit", *args], parser_kwargs={"exit_on_error": exit_on_error})
