import os

import pytest
import torch

os.environ.setdefault("PL_DISABLE_FORK", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def digits_cache(tmp_path_factory):
    """One shared digits shard cache per test session (written once)."""
    path = tmp_path_factory.mktemp("maskdiff-cache")
    os.environ["MASKDIFF_CACHE"] = str(path)
    return path


@pytest.fixture
def one_thread():
    """Run a test with one torch thread (see :func:`tests.helpers.single_thread`)."""
    from tests.helpers import single_thread

    with single_thread():
        yield


@pytest.fixture(scope="session")
def dit_ckpt(tmp_path_factory, digits_cache):
    """A 2-block DiT (8x8 digits) trained for 4 steps with configs/dit/dit_debug_cpu.yaml."""
    from maskdiff.tools.main import main
    from tests.helpers import config_in

    path, ckpt_dir = config_in(tmp_path_factory.mktemp("dit_ckpt"))
    main(["fit", "--config", str(path), "--trainer.max_steps", "4", "--trainer.limit_val_batches", "0"])
    return ckpt_dir / "last.ckpt"
