"""DDP on 2 CPU processes (gloo) gives the gradients of 1 process on the doubled batch, after one training step.

DDP averages the ranks' gradients; a method whose loss is a mean over samples then gets exactly the gradient of
the mean over both ranks' rows. The corruption randomness is made per-row identical in both runs
(:class:`tests.distributed.gradient_step.RowShardedCorruption`), so any difference comes from the distributed step.
"""

import os
import socket
import subprocess
import sys

import pytest
import torch

from tests.distributed.gradient_step import run
from tests.helpers import ROOT, single_thread

METHODS = ("dit", "mdt", "mae")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def ddp_gradients(tmp_path_factory):
    """Gradients of the 2-rank run of every method, launched like torchrun: 2 processes, rank variables set."""
    out = tmp_path_factory.mktemp("ddp-grads")
    port = str(free_port())
    ranks = []
    for rank in range(2):
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        env.update({"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
                    "WORLD_SIZE": "2", "NODE_RANK": "0", "RANK": str(rank), "LOCAL_RANK": str(rank)})
        ranks.append(subprocess.Popen([sys.executable, "-m", "tests.distributed.gradient_step", str(out), *METHODS],
                                      cwd=out, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = [process.communicate(timeout=600)[0] for process in ranks]
    for rank, process in enumerate(ranks):
        assert process.returncode == 0, f"rank {rank}:\n{logs[rank][-4000:]}"
    return out


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_two_rank_gradients_equal_one_process_on_the_doubled_batch(method, ddp_gradients, tmp_path):
    two = torch.load(ddp_gradients / f"{method}-grads-2.pt", weights_only=True)
    with single_thread():
        one = torch.load(run(method, 1, tmp_path), weights_only=True)
    assert (two["world_size"], one["world_size"]) == (2, 1)
    assert two["grads"].keys() == one["grads"].keys() and len(one["grads"]) > 10
    for name, expected in one["grads"].items():
        assert expected.norm() > 0, f"{name} has a zero gradient: the comparison would prove nothing"
        error = (two["grads"][name] - expected).norm() / expected.norm()
        assert error < 1e-6, f"{method} {name}: relative gradient difference {error:.2e}"
