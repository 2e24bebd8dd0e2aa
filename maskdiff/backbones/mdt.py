"""MDT and MDTv2: masked diffusion transformers (Gao et al.), as sail-sg/MDT's ``models.py``.

A DiT whose encoder can run on the visible noisy tokens only. During training a side-interpolater (one extra
block) fills in the hidden positions before the decoder; at inference there is no masking and no
side-interpolater. Every attention layer adds a learnable BEiT-style relative position bias, gathered for the
kept tokens when the sequence is masked. Layout differences from the official module are the same as
:class:`~maskdiff.backbones.dit.DiT`'s (token inputs, ``[ε ‖ variance]`` outputs).

* ``MDT`` (v1): ``blocks`` (``depth``) with the side-interpolater before the last ``decode_layer`` blocks.
* ``MDTv2``: ``en_inblocks`` → ``en_outblocks`` (U-Net-like long skips) → side-interpolater → ``de_blocks``
  (every decoder block also takes the full, unmasked input embedding: the dense input shortcut).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import Mlp, trunc_normal_
from torch import nn

from maskdiff.backbones.base import Backbone
from maskdiff.backbones.dit import (
    DIT_SIZES,
    adaln_condition,
    build_dit_stem,
    init_dit_weights,
    modulate,
    tanh_gelu,
)
from maskdiff.backbones.embeddings import sincos_2d
from maskdiff.backbones.registry import register_backbone
from maskdiff.corruption.masking import Masking, gather_tokens, restore_tokens


# ---------------------------------------------------------------------------------------------- attention
def relative_position_index(side: int) -> torch.Tensor:
    """BEiT's ``(L, L)`` index into a ``((2·side-1)² + 3, heads)`` table for a ``side × side`` token grid."""
    coords = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")).flatten(1)
    relative = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)
    relative[:, :, 0] += side - 1
    relative[:, :, 1] += side - 1
    relative[:, :, 0] *= 2 * side - 1
    return relative.sum(-1)


class RelativePositionBias(nn.Module):
    """Learnable per-head bias for every token pair of a square grid: ``() -> (heads, L, L)``.

    The table has BEiT's 3 extra rows (for cls-token pairs), unused here but kept for checkpoint compatibility.
    """

    def __init__(self, side: int, num_heads: int) -> None:
        super().__init__()
        self.side = side
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * side - 1) ** 2 + 3, num_heads))
        self.register_buffer("relative_position_index", relative_position_index(side), persistent=False)
        trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self, ids_keep: torch.Tensor | None = None) -> torch.Tensor:
        """``(heads, L, L)``, or ``(B, heads, K, K)`` restricted to the kept tokens ``ids_keep (B, K)``."""
        length = self.side**2
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(length, length, -1)
        bias = bias.permute(2, 0, 1)
        if ids_keep is None:
            return bias
        return bias[:, ids_keep[:, :, None], ids_keep[:, None, :]].transpose(0, 1)


class RelPosAttention(nn.Module):
    """Multi-head self-attention with a relative position bias: ``(B, K, D) -> (B, K, D)``."""

    def __init__(self, dim: int, num_heads: int, side: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)
        self.rel_pos_bias = RelativePositionBias(side, num_heads)

    def forward(self, x: torch.Tensor, ids_keep: torch.Tensor | None = None) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        bias = self.rel_pos_bias(ids_keep).to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class MDTBlock(nn.Module):
    """adaLN-Zero block with relative-position attention and an optional long-skip input.

    ``(B, K, D), c (B, D), skip (B, K, D) | None, ids_keep (B, K) | None -> (B, K, D)``.
    """

    def __init__(self, hidden_size: int, num_heads: int, side: int, mlp_ratio: float = 4.0, skip: bool = False) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = RelPosAttention(hidden_size, num_heads, side)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio), act_layer=tanh_gelu)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))
        self.skip_linear = nn.Linear(2 * hidden_size, hidden_size) if skip else None

    def forward(self, x, c, skip=None, ids_keep=None):
        if self.skip_linear is not None:
            x = self.skip_linear(torch.cat([x, skip], dim=-1))
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), ids_keep)
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


# ---------------------------------------------------------------------------------------------- models
class _MaskedDiffusionTransformer(Backbone):
    """Embeddings, side-interpolater and output head shared by MDT and MDTv2 (their block layouts differ)."""

    block_classes = (MDTBlock,)
    takes_timesteps = True
    features_take_timesteps = True
    hidden_tokens = "mask_token"

    def __init__(self, input_size, patch_size, in_channels, hidden_size, num_heads, mlp_ratio, class_dropout_prob,
                 num_classes, learn_sigma, label_embedding_std) -> None:
        super().__init__()
        build_dit_stem(self, input_size, patch_size, in_channels, hidden_size, num_heads, class_dropout_prob,
                       num_classes, learn_sigma, label_embedding_std)
        self.side = self.patchifier.grid[0]
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patchifier.num_tokens, hidden_size))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, self.patchifier.num_tokens, hidden_size))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, hidden_size))
        self.sideblocks = nn.ModuleList([MDTBlock(hidden_size, num_heads, self.side, mlp_ratio)])

    def all_blocks(self) -> list[MDTBlock]:
        raise NotImplementedError

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """DiT's init for every block (side block included), learnable positions from sin-cos, N(0,.02) mask token."""
        init_dit_weights(self, self.all_blocks(), self.final_layer)
        for module in self.modules():
            if isinstance(module, RelativePositionBias):
                trunc_normal_(module.relative_position_bias_table, std=0.02)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=self.label_embedding_std)
        table = torch.from_numpy(sincos_2d(self.hidden_size, self.side)).float().unsqueeze(0)
        self.pos_embed.copy_(table)
        self.decoder_pos_embed.copy_(table)
        nn.init.normal_(self.mask_token, std=0.02)

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "decoder_pos_embed", "mask_token"}

    def embed(self, tokens, t, y, masking: Masking | None):
        """Input embedding (full, ``(B, N, D)``), encoder input (kept tokens only when masked) and condition."""
        if t is None:
            raise ValueError(f"{type(self).__name__} needs timesteps t of shape (B,)")
        full = self.x_embedder(tokens) + self.pos_embed
        x = full if masking is None else gather_tokens(full, masking.ids_keep)
        return full, x, adaln_condition(self.t_embedder, self.y_embedder, t, y)

    def enter_decoder(self, x: torch.Tensor, c: torch.Tensor, masking: Masking | None) -> torch.Tensor:
        """Full-length decoder input: the side-interpolater fills hidden positions when masked (training only)."""
        if masking is None:
            return x + self.decoder_pos_embed
        x = restore_tokens(x, self.mask_token, masking) + self.decoder_pos_embed
        before = x
        for block in self.sideblocks:
            x = self.run_block(block, x, c)
        hidden = masking.mask.unsqueeze(-1).to(x.dtype)
        return x * hidden + before * (1 - hidden)  # masked shortcut: visible tokens bypass the side block

    def forward(self, tokens, t=None, y=None, masking: Masking | None = None) -> torch.Tensor:
        """``tokens (B, N, p*p*C)``, ``t (B,)``, ``y (B,)``, ``masking`` -> ``(B, N, parts * p*p*C)`` (all positions)."""
        full, x, c = self.embed(tokens, t, y, masking)
        x = self.encode(x, c, masking)
        x = self.decode(self.enter_decoder(x, c, masking), c, full)
        return self.final_layer(x, c)

    def forward_features(self, tokens, t=None, y=None, masking: Masking | None = None, depth: int | None = None) -> torch.Tensor:
        """Encoder outputs ``(B, N_seen, D)`` (no prefix tokens, no final norm)."""
        if depth is not None and not 0 <= depth <= self.num_blocks:
            raise ValueError(f"depth {depth} is out of range; this encoder has blocks 0..{self.num_blocks}")
        _, x, c = self.embed(tokens, t, y, masking)
        return self.encode(x, c, masking, depth)


class MDT(_MaskedDiffusionTransformer):
    """MDTv1: ``depth`` blocks; the side-interpolater sits before the last ``decode_layer`` of them.

    Args: as :class:`~maskdiff.backbones.dit.DiT`, plus ``decode_layer`` (decoder blocks; 2 in every release).
    """

    def __init__(self, input_size: int = 32, patch_size: int = 2, in_channels: int = 4, hidden_size: int = 1152,
                 depth: int = 28, num_heads: int = 16, mlp_ratio: float = 4.0, class_dropout_prob: float = 0.1,
                 num_classes: int = 1000, learn_sigma: bool = True, decode_layer: int = 2,
                 label_embedding_std: float = 0.02) -> None:
        super().__init__(input_size, patch_size, in_channels, hidden_size, num_heads, mlp_ratio, class_dropout_prob,
                         num_classes, learn_sigma, label_embedding_std)
        if not 0 < decode_layer < depth:
            raise ValueError(f"decode_layer {decode_layer} must be between 1 and depth - 1 = {depth - 1}")
        self.decode_layer = decode_layer
        self.blocks = nn.ModuleList([MDTBlock(hidden_size, num_heads, self.side, mlp_ratio) for _ in range(depth)])
        self.initialize_weights()

    def all_blocks(self) -> list[MDTBlock]:
        return [*self.blocks, *self.sideblocks]

    @property
    def num_blocks(self) -> int:
        return len(self.blocks) - self.decode_layer

    def encode(self, x, c, masking, depth=None):
        ids_keep = None if masking is None else masking.ids_keep
        for block in self.blocks[: self.num_blocks][:depth]:
            x = self.run_block(block, x, c, None, ids_keep)
        return x

    def decode(self, x, c, full):
        for block in self.blocks[self.num_blocks :]:
            x = self.run_block(block, x, c)
        return x


class MDTv2(_MaskedDiffusionTransformer):
    """MDTv2: ``(depth - decode_layer) // 2`` in-blocks and as many out-blocks with long skips, then
    ``decode_layer`` decoder blocks that each also take the full input embedding (dense input shortcut).

    Args: as :class:`MDT`; released ``decode_layer``: XL/2 4, S/2 6.
    """

    def __init__(self, input_size: int = 32, patch_size: int = 2, in_channels: int = 4, hidden_size: int = 1152,
                 depth: int = 28, num_heads: int = 16, mlp_ratio: float = 4.0, class_dropout_prob: float = 0.1,
                 num_classes: int = 1000, learn_sigma: bool = True, decode_layer: int = 4,
                 label_embedding_std: float = 0.02) -> None:
        super().__init__(input_size, patch_size, in_channels, hidden_size, num_heads, mlp_ratio, class_dropout_prob,
                         num_classes, learn_sigma, label_embedding_std)
        half = (depth - decode_layer) // 2
        if half < 1 or decode_layer < 1:
            raise ValueError(f"depth {depth} with decode_layer {decode_layer} leaves no encoder blocks")
        self.decode_layer = decode_layer
        make = lambda skip: MDTBlock(hidden_size, num_heads, self.side, mlp_ratio, skip=skip)  # noqa: E731
        self.en_inblocks = nn.ModuleList([make(False) for _ in range(half)])
        self.en_outblocks = nn.ModuleList([make(True) for _ in range(half)])
        self.de_blocks = nn.ModuleList([make(True) for _ in range(decode_layer)])
        self.initialize_weights()

    def all_blocks(self) -> list[MDTBlock]:
        return [*self.en_inblocks, *self.en_outblocks, *self.de_blocks, *self.sideblocks]

    @property
    def num_blocks(self) -> int:
        return 2 * len(self.en_inblocks)

    @property
    def encoder_blocks(self) -> list[nn.Module]:
        return [*self.en_inblocks, *self.en_outblocks]

    def encode(self, x, c, masking, depth=None):
        ids_keep = None if masking is None else masking.ids_keep
        depth = self.num_blocks if depth is None else depth
        skips = []
        for i, block in enumerate(self.en_inblocks[:depth]):
            x = self.run_block(block, x, c, None, ids_keep)
            skips.append(x)
        for block in self.en_outblocks[: max(depth - len(self.en_inblocks), 0)]:
            x = self.run_block(block, x, c, skips.pop(), ids_keep)
        return x

    def decode(self, x, c, full):
        for block in self.de_blocks:
            x = self.run_block(block, x, c, full)
        return x


# ---------------------------------------------------------------------------------------------- sizes
# Decoder blocks: v1 releases use 2; v2 XL and S as released, B and L unverified (4); T and Nano are CPU sizes.
MDT_DECODE_LAYERS = {"XL": 2, "L": 2, "B": 2, "S": 2, "T": 2, "Nano": 1}
MDTV2_DECODE_LAYERS = {"XL": 4, "L": 4, "B": 4, "S": 6, "T": 2}


def _factory(cls, size: str, patch: int, decode_layer: int):
    def build(**overrides):
        return cls(**{**DIT_SIZES[size], "patch_size": patch, "decode_layer": decode_layer, **overrides})

    return build


for _size, _layers in MDT_DECODE_LAYERS.items():
    for _patch in (2, 4, 8):
        register_backbone(f"MDT-{_size}/{_patch}", _factory(MDT, _size, _patch, _layers))
for _size, _layers in MDTV2_DECODE_LAYERS.items():
    register_backbone(f"MDTv2-{_size}/2", _factory(MDTv2, _size, 2, _layers))
