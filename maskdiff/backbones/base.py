"""The contract every backbone meets, so corruptions, objectives and samplers work with any of them."""

from __future__ import annotations

import torch
from torch import nn

from maskdiff.backbones.patching import Patchifier
from maskdiff.corruption.masking import Masking


class Backbone(nn.Module):
    """A token-to-token network with timm-like methods.

    ``forward(tokens, t, y, masking) -> (B, N, P_out)``: ``tokens (B, N, P)`` are patch tokens (see
    :class:`Patchifier`), ``t (B,)`` the timestep the network is conditioned on (``None`` for
    recognition-only backbones), ``y (B,)`` class labels (``None`` = unconditional), ``masking`` which tokens the
    encoder may see (``None`` = all). ``P_out = output_parts * P``: when a backbone predicts several things
    (learned variance, UMD's [x0 ‖ ε]) they are concatenated along the last axis, each in token layout.

    Subclasses set ``patchifier``, ``num_classes`` (0 = unconditional), ``output_parts``, ``block_classes``
    (the transformer block types, for FSDP wrapping and activation checkpointing) and ``num_prefix_tokens``
    (cls / register tokens that precede the patch tokens in :meth:`forward_features`).
    """

    patchifier: Patchifier
    num_classes: int = 0
    output_parts: int = 1
    num_prefix_tokens: int = 0
    block_classes: tuple[type[nn.Module], ...] = ()
    grad_checkpointing: bool = False

    def forward(
        self,
        tokens: torch.Tensor,
        t: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
        masking: Masking | None = None,
    ) -> torch.Tensor:
        raise NotImplementedError

    def forward_features(
        self,
        tokens: torch.Tensor,
        t: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
        masking: Masking | None = None,
        depth: int | None = None,
    ) -> torch.Tensor:
        """Encoder features ``(B, num_prefix_tokens + N_seen, D)`` for probes and fine-tuning.

        ``depth``: run only the first ``depth`` encoder blocks (``None``: all of them, then the encoder's final
        norm if it has one). ``N_seen`` is N, or the kept count when ``masking`` is given.
        """
        raise NotImplementedError

    @property
    def num_blocks(self) -> int:
        """Encoder blocks that ``forward_features(depth=...)`` can stop after."""
        raise NotImplementedError

    def no_weight_decay(self) -> set[str]:
        """Parameter names that should not be weight-decayed (timm convention)."""
        return set()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def run_block(self, block: nn.Module, *args) -> torch.Tensor:
        """Call ``block`` with activation checkpointing when enabled and training."""
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)
        return block(*args)
