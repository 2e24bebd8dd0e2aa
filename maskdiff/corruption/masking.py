"""Token masking: MAE's per-sample random masking and VideoMAE-style tube masking.

Convention: ``mask`` is bool ``(B, N)`` with **True = hidden from the encoder**. Every sample keeps the same
number of tokens, so masked batches stay rectangular (no padding) and compiled shapes stay static.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

HiddenTokens = Literal["drop", "mask_token", "noised"]
"""What a backbone does with the tokens a :class:`Masking` hides: ``drop`` (its encoder reads only the visible ones:
MAE, UMD), ``mask_token`` (hidden positions are replaced by a learned mask token: MDT) or ``noised`` (it reads their
noised values and denoises them: DiffMAE)."""


@dataclass
class Masking:
    """Which tokens an encoder sees.

    Attributes:
        mask: ``(B, N)`` bool, True = hidden.
        ids_keep: ``(B, N_keep)`` long, indices of the visible tokens in original order of the shuffle.
        ids_restore: ``(B, N)`` long, inverse permutation: ``gather(cat[kept, hidden], ids_restore)`` restores order.
    """

    mask: torch.Tensor
    ids_keep: torch.Tensor
    ids_restore: torch.Tensor

    @property
    def num_keep(self) -> int:
        return self.ids_keep.shape[1]

    def select(self, rows: slice) -> "Masking":
        return Masking(self.mask[rows], self.ids_keep[rows], self.ids_restore[rows])


def num_kept(num_tokens: int, mask_ratio: float) -> int:
    """MAE's kept-token count: ``int(N * (1 - ratio))`` (floor)."""
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask ratio {mask_ratio} is outside [0, 1); expected a fraction of tokens to hide")
    return int(num_tokens * (1 - mask_ratio))


def masking_from_noise(noise: torch.Tensor, num_keep: int) -> Masking:
    """MAE's argsort masking: the ``num_keep`` tokens with the smallest ``noise`` ``(B, N)`` stay visible."""
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :num_keep]
    mask = torch.ones_like(noise, dtype=torch.bool)
    mask[:, :num_keep] = False
    mask = torch.gather(mask, 1, ids_restore)
    return Masking(mask=mask, ids_keep=ids_keep, ids_restore=ids_restore)


def random_masking(
    batch: int, num_tokens: int, mask_ratio: float, device=None, generator: torch.Generator | None = None
) -> Masking:
    """Independent uniform random masks, the same count per sample (MAE ``random_masking``)."""
    noise = torch.rand(batch, num_tokens, generator=generator, device=generator.device if generator else None)
    return masking_from_noise(noise.to(device), num_kept(num_tokens, mask_ratio))


def tube_masking(
    batch: int, grid: tuple[int, int, int], mask_ratio: float, device=None, generator: torch.Generator | None = None
) -> Masking:
    """Video tube masking: one random spatial mask per sample, hiding the same ``(h, w)`` cells in every frame.

    ``grid`` is the ``(t, h, w)`` token grid; the kept count is ``t * int(h * w * (1 - ratio))``.
    """
    t, h, w = grid
    noise = torch.rand(batch, h * w, generator=generator, device=generator.device if generator else None)
    keep = num_kept(h * w, mask_ratio)
    spatial_shuffle = torch.argsort(noise, dim=1)  # (B, hw): kept cells first
    frame_offsets = (torch.arange(t, device=noise.device) * h * w).view(1, t, 1)
    shuffled = spatial_shuffle.unsqueeze(1) + frame_offsets  # (B, t, hw)
    ids_shuffle = torch.cat([shuffled[:, :, :keep].flatten(1), shuffled[:, :, keep:].flatten(1)], dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    mask = torch.ones(batch, t * h * w, dtype=torch.bool, device=noise.device)
    mask[:, : t * keep] = False
    mask = torch.gather(mask, 1, ids_restore)
    return Masking(mask=mask.to(device), ids_keep=ids_shuffle[:, : t * keep].to(device), ids_restore=ids_restore.to(device))


def gather_tokens(tokens: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``tokens (B, N, D)``, ``ids (B, K)`` -> ``(B, K, D)``."""
    return torch.gather(tokens, 1, ids.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


def restore_tokens(kept: torch.Tensor, filler: torch.Tensor, masking: Masking) -> torch.Tensor:
    """Put ``kept (B, K, D)`` back in place and fill hidden positions with ``filler (1|B, 1, D)``: ``(B, N, D)``."""
    b, k, d = kept.shape
    n = masking.ids_restore.shape[1]
    full = torch.cat([kept, filler.expand(b, n - k, d).to(kept.dtype)], dim=1)
    return gather_tokens(full, masking.ids_restore)
