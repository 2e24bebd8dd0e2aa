"""DiT: the diffusion transformer of Peebles & Xie, exactly as facebookresearch/DiT's ``models.py``.

Differences from the official module are of layout only, so official checkpoints convert losslessly
(:func:`maskdiff.convert.dit.convert_dit_state_dict`):

* the input is patch tokens ``(B, N, p*p*C)``; the patch embedding is the equivalent ``Linear`` (the official
  ``Conv2d`` with kernel = stride = p, weights permuted to (p_row, p_col, channel) order);
* with ``learn_sigma`` the output is ``[ε tokens ‖ variance tokens]`` along the last axis, each in token layout.
"""

from __future__ import annotations

import torch
from timm.layers import Attention, Mlp
from torch import nn

from maskdiff.backbones.base import Backbone
from maskdiff.backbones.embeddings import LabelEmbedder, TimestepEmbedder, label_embedder, sincos_2d
from maskdiff.backbones.patching import Patchifier
from maskdiff.backbones.registry import register_backbone
from maskdiff.corruption.masking import Masking


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation ``x·(1 + scale) + shift``; ``x (B, N, D)``, ``shift, scale (B, D)``."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def tanh_gelu() -> nn.Module:
    return nn.GELU(approximate="tanh")


def adaln_condition(t_embedder: TimestepEmbedder, y_embedder: LabelEmbedder | None, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
    """DiT's condition ``c = t_emb + y_emb`` ``(B, D)``; ``y=None`` means the null class (unconditional)."""
    c = t_embedder(t)
    if y_embedder is None:
        return c
    if y is None:
        if y_embedder.dropout_prob <= 0:
            raise ValueError("this model was built without a null class (class_dropout_prob=0); pass labels y")
        y = torch.full((t.shape[0],), y_embedder.num_classes, dtype=torch.long, device=t.device)
    return c + y_embedder(y)


def init_dit_weights(model: nn.Module, blocks: list[nn.Module], final_layer: "FinalLayer") -> None:
    """DiT's init over ``model``: xavier linears, N(0, 0.02) time MLP, zero adaLN modulation and output layer.

    ``model`` must have ``x_embedder`` and ``t_embedder``; the label table is left to the caller.
    """

    def basic_init(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    model.apply(basic_init)
    nn.init.zeros_(model.x_embedder.bias)
    nn.init.normal_(model.t_embedder.mlp[0].weight, std=0.02)
    nn.init.normal_(model.t_embedder.mlp[2].weight, std=0.02)
    for block in blocks:
        nn.init.zeros_(block.adaLN_modulation[-1].weight)
        nn.init.zeros_(block.adaLN_modulation[-1].bias)
    for layer in (final_layer.adaLN_modulation[-1], final_layer.linear):
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)


# ---------------------------------------------------------------------------------------------- blocks
class DiTBlock(nn.Module):
    """adaLN-Zero transformer block: ``(B, N, D), c (B, D) -> (B, N, D)``.

    ``norm_affine``: LayerNorms with their own scale and bias (UMD's blocks) besides the adaLN modulation (DiT: off).
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, norm_affine: bool = False) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=norm_affine, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads=num_heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=norm_affine, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio), act_layer=tanh_gelu)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    """adaLN (shift, scale) + linear to ``out_features`` per token: ``(B, N, D), c (B, D) -> (B, N, out)``."""

    def __init__(self, hidden_size: int, out_features: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, out_features)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


# ---------------------------------------------------------------------------------------------- model
def build_dit_stem(model: Backbone, input_size: int, patch_size: int, in_channels: int, hidden_size: int, num_heads: int,
                   class_dropout_prob: float, num_classes: int, learn_sigma: bool, label_embedding_std: float) -> None:
    """Give a DiT-family ``model`` its patchifier, contract attributes, patch/time/label embedders and output head."""
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
    model.patchifier = Patchifier(input_size, patch_size, in_channels)
    model.num_classes = num_classes
    model.learn_sigma = learn_sigma
    model.output_parts = 2 if learn_sigma else 1
    model.hidden_size = hidden_size
    model.label_embedding_std = label_embedding_std
    values = model.patchifier.values_per_patch
    model.x_embedder = nn.Linear(values, hidden_size)
    model.t_embedder = TimestepEmbedder(hidden_size)
    model.y_embedder = label_embedder(num_classes, hidden_size, class_dropout_prob)
    model.final_layer = FinalLayer(hidden_size, values * model.output_parts)


class DiT(Backbone):
    """Class-conditional diffusion transformer with adaLN-Zero conditioning.

    Args:
        input_size: side of the input (latent side, e.g. 32 for 256-px images, or pixel side).
        patch_size: patch side p.
        in_channels: C.
        hidden_size, depth, num_heads, mlp_ratio: transformer size.
        class_dropout_prob: probability of replacing a label by the null class in training (CFG).
        num_classes: number of classes; 0 builds an unconditional model.
        learn_sigma: also predict the variance interpolation (output parts: ε and v).
        label_embedding_std: init std of the class embeddings (official: 0.02). Short runs on small data learn
            class conditioning much faster with ~1.0 (see docs/benchmarks.md); the label then weighs as much
            as the timestep in the adaLN condition from the start.
    """

    block_classes = (DiTBlock,)
    takes_timesteps = True
    features_take_timesteps = True

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = True,
        label_embedding_std: float = 0.02,
    ) -> None:
        super().__init__()
        build_dit_stem(self, input_size, patch_size, in_channels, hidden_size, num_heads, class_dropout_prob,
                       num_classes, learn_sigma, label_embedding_std)
        self.register_buffer("pos_embed", torch.empty(1, self.patchifier.num_tokens, hidden_size), persistent=False)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.initialize_weights()

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """DiT's init (:func:`init_dit_weights`), N(0, label_embedding_std) class table, sin-cos positions."""
        init_dit_weights(self, list(self.blocks), self.final_layer)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=self.label_embedding_std)
        table = torch.from_numpy(sincos_2d(self.hidden_size, self.patchifier.grid[0])).unsqueeze(0)
        if self.pos_embed.device.type != "meta":  # deferred (meta) init: call initialize_weights after to_empty
            self.pos_embed.copy_(table)

    def condition(self, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        return adaln_condition(self.t_embedder, self.y_embedder, t, y)

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def _encode(self, tokens, t, y, masking, depth: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if masking is not None:
            raise ValueError("DiT has no masked encoder (it always sees all tokens); use an MDT backbone for masking")
        if t is None:
            raise ValueError("DiT needs timesteps t of shape (B,)")
        if depth is not None and not 0 <= depth <= self.num_blocks:
            raise ValueError(f"depth {depth} is out of range; this DiT has blocks 0..{self.num_blocks}")
        x = self.x_embedder(tokens) + self.pos_embed.to(tokens.dtype)
        c = self.condition(t, y)
        for block in self.blocks[:depth]:
            x = self.run_block(block, x, c)
        return x, c

    def forward_features(self, tokens, t=None, y=None, masking: Masking | None = None, depth: int | None = None) -> torch.Tensor:
        """Block outputs ``(B, N, D)`` (DiT has no prefix tokens and no final encoder norm)."""
        return self._encode(tokens, t, y, masking, depth)[0]

    def forward(self, tokens, t=None, y=None, masking: Masking | None = None) -> torch.Tensor:
        """``tokens (B, N, p*p*C)``, ``t (B,)``, ``y (B,)`` -> ``(B, N, parts * p*p*C)``."""
        x, c = self._encode(tokens, t, y, masking)
        return self.final_layer(x, c)


# ---------------------------------------------------------------------------------------------- sizes
DIT_SIZES = {
    "XL": dict(depth=28, hidden_size=1152, num_heads=16),
    "L": dict(depth=24, hidden_size=1024, num_heads=16),
    "B": dict(depth=12, hidden_size=768, num_heads=12),
    "S": dict(depth=12, hidden_size=384, num_heads=6),
    # Small sizes for CPU work (digits, tests); not in the paper.
    "T": dict(depth=6, hidden_size=192, num_heads=3),
    "Nano": dict(depth=2, hidden_size=32, num_heads=2),
}


def _dit_factory(size: str, patch: int):
    def build(**overrides) -> DiT:
        return DiT(**{**DIT_SIZES[size], "patch_size": patch, **overrides})

    return build


for _size in DIT_SIZES:
    for _patch in (2, 4, 8):
        register_backbone(f"DiT-{_size}/{_patch}", _dit_factory(_size, _patch))
