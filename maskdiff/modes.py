"""Train/eval mode switching that always restores the previous mode."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def evaluating(module: nn.Module) -> Iterator[nn.Module]:
    """Run ``module`` in eval mode inside the block and restore its train/eval mode afterwards, also on an error."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)
