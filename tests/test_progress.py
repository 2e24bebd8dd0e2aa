"""Progress bars: rank 0 only, off without a terminal, forced on/off by MASKDIFF_PROGRESS or a flag."""

from __future__ import annotations

import io
import sys

import pytest

from maskdiff.progress import progress, progress_enabled, sampling_progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def clean_env(monkeypatch):
    for name in ("RANK", "SLURM_PROCID", "LOCAL_RANK", "MASKDIFF_PROGRESS"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_off_without_a_terminal_on_with_one(clean_env):
    clean_env.setattr(sys, "stderr", io.StringIO())
    assert not progress_enabled()
    clean_env.setattr(sys, "stderr", Terminal())
    assert progress_enabled()
    assert not progress_enabled(False)
    clean_env.setattr(sys, "stderr", io.StringIO())
    assert progress_enabled(True)


def test_environment_forces_and_rank_silences(clean_env):
    clean_env.setattr(sys, "stderr", io.StringIO())
    clean_env.setenv("MASKDIFF_PROGRESS", "1")
    assert progress_enabled()
    clean_env.setenv("RANK", "1")
    assert not progress_enabled()
    clean_env.setenv("RANK", "0")
    clean_env.setenv("MASKDIFF_PROGRESS", "0")
    clean_env.setattr(sys, "stderr", Terminal())
    assert not progress_enabled()


def test_bar_counts_sampling_steps(clean_env):
    clean_env.setenv("MASKDIFF_PROGRESS", "1")
    output = io.StringIO()
    bar, callback = sampling_progress(3, enabled=True)
    bar.fp = output
    for step in range(3):
        callback(step, None, None)
    assert bar.n == 3
    bar.close()
    assert list(progress(range(4), desc="x", enabled=False)) == [0, 1, 2, 3]
