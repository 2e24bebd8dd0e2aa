"""Embeddings shared by the backbones: sin-cos position tables, timestep and label embedders."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn


# ---------------------------------------------------------------------------------------------- positions
def sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
    """``(M,)`` positions -> ``(M, dim)``: ``[sin(pos·ω), cos(pos·ω)]``, ``ω_i = 10000^(-i/(dim/2))`` (MAE)."""
    if dim % 2:
        raise ValueError(f"sin-cos embedding width {dim} must be even")
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = np.einsum("m,d->md", positions.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d(dim: int, grid_size: int) -> np.ndarray:
    """``(G*G, dim)`` table in MAE/DiT's exact order: the first half encodes the w-coordinate (meshgrid w first)."""
    coords = np.arange(grid_size, dtype=np.float64)
    grid_w, grid_h = np.meshgrid(coords, coords)  # grid_w varies along columns, as in MAE's meshgrid(grid_w, grid_h)
    return np.concatenate([sincos_1d(dim // 2, grid_w), sincos_1d(dim // 2, grid_h)], axis=1)


def sincos_3d(dim: int, grid: tuple[int, int, int], temporal_fraction: float = 0.25) -> np.ndarray:
    """``(t*h*w, dim)`` space-time table: a share of dims for time, the rest split as ``sincos_2d``."""
    t, h, w = grid
    if h != w:
        raise ValueError(f"space-time embedding needs a square spatial grid, got {h}x{w}")
    dim_t = int(dim * temporal_fraction) // 2 * 2
    spatial = sincos_2d(dim - dim_t, h)  # (h*w, dim - dim_t)
    temporal = sincos_1d(dim_t, np.arange(t, dtype=np.float64))  # (t, dim_t)
    return np.concatenate([np.repeat(temporal, h * w, axis=0), np.tile(spatial, (t, 1))], axis=1)


# ---------------------------------------------------------------------------------------------- timesteps
def timestep_frequencies(
    t: torch.Tensor, dim: int, max_period: float = 10000.0, cos_first: bool = True, divisor_shift: int = 0
) -> torch.Tensor:
    """``(B,)`` (possibly fractional) timesteps -> ``(B, dim)`` sinusoids; DiT/MDT put cos first, UMD sin first.

    Frequencies are ``exp(-log(max_period) · i / (dim//2 - divisor_shift))``: DiT divides by ``dim//2``, UMD's
    tensor2tensor-style embedding by ``dim//2 - 1`` (its lowest frequency is exactly ``1 / max_period``).
    """
    half = dim // 2
    divisor = max(half - divisor_shift, 1)
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / divisor)
    args = t[:, None].float() * freqs[None]
    parts = [torch.cos(args), torch.sin(args)] if cos_first else [torch.sin(args), torch.cos(args)]
    embedding = torch.cat(parts, dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


class TimestepEmbedder(nn.Module):
    """DiT's timestep embedder: 256-d cos-first sinusoid -> Linear -> SiLU -> Linear. ``(B,)`` -> ``(B, D)``."""

    def __init__(self, hidden_size: int, frequency_size: int = 256) -> None:
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(nn.Linear(frequency_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        frequencies = timestep_frequencies(t, self.frequency_size)
        return self.mlp(frequencies.to(self.mlp[0].weight.dtype))


def label_embedder(num_classes: int, hidden_size: int, dropout_prob: float) -> "LabelEmbedder | None":
    """A backbone's :class:`LabelEmbedder` for ``num_classes`` classes, ``None`` for an unconditional backbone
    (``num_classes`` 0); a negative ``num_classes`` is refused."""
    if num_classes < 0:
        raise ValueError(f"num_classes {num_classes} is negative; expected the number of classes of a "
                         "class-conditional model, or 0 for an unconditional one")
    return LabelEmbedder(num_classes, hidden_size, dropout_prob) if num_classes > 0 else None


class LabelEmbedder(nn.Module):
    """Class embedding with a null class (index ``num_classes``) for classifier-free guidance.

    During training each label is replaced by the null class with probability ``dropout_prob``.
    ``(B,)`` long -> ``(B, D)``.
    """

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        if self.training and self.dropout_prob > 0:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        # Checked on the CPU only: on an accelerator the check would sync every step (the lookup asserts there).
        if labels.device.type == "cpu" and labels.numel() and (labels.min() < 0 or labels.max() >= self.embedding_table.num_embeddings):
            raise ValueError(
                f"class label out of range: got labels in [{int(labels.min())}, {int(labels.max())}], expected "
                f"0..{self.num_classes - 1} (or the null class {self.num_classes} when dropout_prob > 0)"
            )
        return self.embedding_table(labels)
