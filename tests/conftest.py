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
