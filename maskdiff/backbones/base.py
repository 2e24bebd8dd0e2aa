"""The contract every backbone meets, so corruptions, objectives and samplers work with any of them."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from maskdiff.backbones.patching import Patchifier
from maskdiff.corruption.masking import HiddenTokens, Masking

Pooling = Literal["cls", "mean", "prefix_mean"]


class Backbone(nn.Module):
    """A token-to-token network with timm-like methods.

    ``forward(tokens, t, y, masking) -> (B, N, P_out)``: ``tokens (B, N, P)`` are patch tokens (see
    :class:`Patchifier`), ``t (B,)`` the timestep the network is conditioned on (``None`` for
    recognition-only backbones), ``y (B,)`` class labels (``None`` = unconditional), ``masking`` which tokens the
    encoder may see (``None`` = all). ``P_out = output_parts * P``: when a backbone predicts several things
    (learned variance, UMD's [x0 ‖ ε]) they are concatenated along the last axis, each in token layout.

    What a backbone declares (methods check it against the corruption and objective when they are built):

    Attributes:
        patchifier: the token layout it reads and writes.
        num_classes: classes of its label embedding (0 = unconditional).
        output_parts: token-layout blocks in its output.
        takes_timesteps: :meth:`forward` is conditioned on ``t`` (diffusion backbones); a corruption that adds noise
            needs such a backbone, and one that adds none needs a backbone without.
        features_take_timesteps: :meth:`forward_features` is conditioned on ``t`` (probes then pick a timestep;
            DiffMAE's encoder is not, although its decoder is).
        hidden_tokens: what it does with the tokens a ``masking`` hides (``drop``, ``mask_token`` or ``noised``,
            see :data:`~maskdiff.corruption.masking.HiddenTokens`); ``None``: it cannot mask (it always sees every
            token, like DiT).
        num_prefix_tokens: cls / register tokens that precede the patch tokens in :meth:`forward_features`.
        default_pooling: the feature probes read by default: ``cls`` with a prefix token, else ``mean``.
        block_classes: the transformer block types, for FSDP wrapping and activation checkpointing.
    """

    patchifier: Patchifier
    num_classes: int = 0
    output_parts: int = 1
    takes_timesteps: bool = False
    features_take_timesteps: bool = False
    hidden_tokens: HiddenTokens | None = None
    num_prefix_tokens: int = 0
    block_classes: tuple[type[nn.Module], ...] = ()
    grad_checkpointing: bool = False

    @property
    def default_pooling(self) -> Pooling:
        return "cls" if self.num_prefix_tokens >= 1 else "mean"

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

    @property
    def global_pool_norm(self) -> nn.Module | None:
        """The norm that mean pooling of the pre-norm patch tokens goes through for probes (MAE's official
        ``global_pool`` path: ``fc_norm``), or ``None``: mean pooling reads the encoder's normed tokens."""
        return None

    @property
    def encoder_blocks(self) -> list[nn.Module]:
        """The encoder's transformer blocks in order, the ``num_blocks`` that ``forward_features(depth=...)`` counts."""
        return list(self.blocks)[: self.num_blocks]

    def encode_context(self, tokens: torch.Tensor, masking: Masking):
        """Run the encoder once on the tokens ``masking`` keeps, for :meth:`decode_hidden` (backbones with
        ``hidden_tokens == "noised"``, whose decoder denoises the hidden tokens: DiffMAE)."""
        raise NotImplementedError(f"{type(self).__name__} has no separate encoder context (hidden_tokens={self.hidden_tokens!r})")

    def decode_hidden(self, context, noisy: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Noisy hidden tokens ``(B, M, P)`` at timesteps ``t (B,)`` -> the backbone's predictions ``(B, M, P)``, given
        an :meth:`encode_context` of the visible ones."""
        raise NotImplementedError(f"{type(self).__name__} cannot denoise hidden tokens alone (hidden_tokens={self.hidden_tokens!r})")

    def no_weight_decay(self) -> set[str]:
        """Parameter names that should not be weight-decayed (timm convention)."""
        return set()

    def decays(self, name: str, parameter: nn.Parameter) -> bool:
        """Whether the methods' optimizer weight-decays ``parameter`` (``name`` as in ``named_parameters``): timm's
        rule, neither 1-D parameters (biases, norms) nor the names in :meth:`no_weight_decay`."""
        return parameter.ndim > 1 and name not in self.no_weight_decay()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def run_block(self, block: nn.Module, *args) -> torch.Tensor:
        """Call ``block`` with activation checkpointing when enabled and training."""
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)
        return block(*args)
