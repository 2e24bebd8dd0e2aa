"""``torch.compile`` of a backbone in place, keeping its state-dict keys (no ``_orig_mod.`` prefix).

Only the backbone is compiled, never a whole LightningModule (``self.log`` inside compiled code breaks, and the
EMA copy, samplers and autoencoder gain nothing). Masked corruptions keep the number of kept tokens fixed per
view (:mod:`maskdiff.corruption.masking`), so a training step compiles once per distinct view shape: one graph
for DiT, MAE and DiffMAE, two for MDT (full and masked pass) and UMD (noised and noise-free halves of the batch).
MDTv2's mask ratio drawn per batch changes the kept count every step: after one recompilation the token
dimension is marked dynamic (``torch._dynamo`` automatic dynamic shapes), then it stays compiled.

:func:`compile_blocks` is regional compilation: each transformer block is compiled instead of the whole backbone.
Identical blocks share their compiled graphs (their parameters are graph inputs), so an XL backbone compiles in
about the time of one block instead of an unrolled graph of all of them; the code between blocks stays eager.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

COMPILE_OPTIONS = frozenset(inspect.signature(torch.compile).parameters) - {"model"}


def check_compile_kwargs(compile_kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """``compile_kwargs`` as a dict, or ValueError naming an option ``torch.compile`` does not take."""
    compile_kwargs = dict(compile_kwargs or {})
    unknown = sorted(set(compile_kwargs) - COMPILE_OPTIONS)
    if unknown:
        raise ValueError(f"unknown torch.compile option(s) {unknown}; expected some of {sorted(COMPILE_OPTIONS)}")
    return compile_kwargs


def is_compiled(module: nn.Module) -> bool:
    """Whether ``module``'s call goes through :meth:`nn.Module.compile`."""
    return getattr(module, "_compiled_call_impl", None) is not None


def compile_blocks(backbone: nn.Module, **compile_kwargs: Any) -> int:
    """Compile, in place, every submodule of ``backbone`` that is an instance of its ``block_classes`` (the
    transformer blocks a backbone declares for FSDP and activation checkpointing); blocks already compiled are
    left as they are. State-dict keys stay the same. ``compile_kwargs`` go to :func:`torch.compile`.

    Returns the number of blocks compiled by this call.
    """
    compile_kwargs = check_compile_kwargs(compile_kwargs)
    classes = tuple(backbone.block_classes)
    if not classes:
        raise ValueError(f"{type(backbone).__name__} declares no block_classes to compile one by one")
    blocks = [module for module in backbone.modules() if isinstance(module, classes) and not is_compiled(module)]
    for block in blocks:
        block.compile(**compile_kwargs)
    return len(blocks)


def compile_in_place(backbone: nn.Module, features: bool = False, **compile_kwargs: Any) -> nn.Module:
    """Compile ``backbone``'s call (``nn.Module.compile``: parameters, buffers and state-dict keys unchanged), and
    with ``features`` its ``forward_features`` (what probes and fine-tuning call). Compiling twice is a no-op.

    ``compile_kwargs`` go to :func:`torch.compile` (``mode``, ``backend``, ``dynamic``, ``fullgraph``, ``options``).
    Returns ``backbone``.
    """
    compile_kwargs = check_compile_kwargs(compile_kwargs)
    if not is_compiled(backbone):
        backbone.compile(**compile_kwargs)
    if features and "forward_features" not in vars(backbone):
        backbone.forward_features = torch.compile(backbone.forward_features, **compile_kwargs)
    return backbone
