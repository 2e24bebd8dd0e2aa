"""MAE: the masked autoencoder of He et al., exactly as facebookresearch/mae's ``models_mae.MaskedAutoencoderViT``.

A ViT encoder runs on the visible patch tokens (plus a cls token); a light decoder re-inserts a shared mask token
at the hidden positions and predicts every patch. Differences from the official module are of layout only, so
official checkpoints convert losslessly (:func:`maskdiff.convert.mae.convert_mae_state_dict`):

* the input is patch tokens ``(B, N, p*p*C)``; the patch embedding is the equivalent ``Linear`` (the official
  ``Conv2d`` with kernel = stride = p, weights permuted to (p_row, p_col, channel) order);
* ``pos_embed`` and ``decoder_pos_embed`` (frozen parameters in the official state dict) are computed buffers;
* masking is given (:class:`~maskdiff.corruption.masking.Masking`) instead of drawn inside ``forward``, and no loss
  is computed here (:class:`~maskdiff.objectives.MaskedReconstruction` does it).

Average-pool features are the official ``models_vit`` ``global_pool`` path: ``fc_norm`` over the mean of the patch
tokens after the last block, *before* the final ``norm`` (:attr:`MAE.global_pool_norm`). ``fc_norm`` is a LayerNorm
(eps 1e-6) without parameters, as the freshly initialised one of MAE's ``--global_pool`` linear probe, unless the
backbone is built with ``fc_norm=True`` (a converted fine-tuned checkpoint carries its trained weights).
"""

from __future__ import annotations

import math
from functools import partial

import torch
from timm.models.vision_transformer import Block
from torch import nn

from maskdiff.backbones.base import Backbone
from maskdiff.backbones.embeddings import sincos_2d
from maskdiff.backbones.patching import Patchifier
from maskdiff.backbones.registry import register_backbone
from maskdiff.corruption.masking import Masking, gather_tokens, restore_tokens

DECODER_PREFIXES = ("decoder_embed.", "mask_token", "decoder_blocks.", "decoder_norm.", "decoder_pred.")


def position_table(dim: int, grid: tuple[int, ...]) -> torch.Tensor:
    """MAE's fixed positions with the zero cls row: ``(1, 1 + prod(grid), dim)``."""
    if len(grid) != 2 or grid[0] != grid[1]:
        raise ValueError(f"MAE's sin-cos positions need a square 2-D token grid, got {grid}")
    table = torch.from_numpy(sincos_2d(dim, grid[0])).float()
    return torch.cat([torch.zeros(1, dim), table]).unsqueeze(0)


def vit_blocks(width: int, depth: int, num_heads: int, mlp_ratio: float, drop_path_rate: float = 0.0) -> nn.ModuleList:
    """``depth`` timm ``Block``s as MAE builds them (qkv bias, LayerNorm eps 1e-6), drop path rising to the rate."""
    norm_layer = partial(nn.LayerNorm, eps=1e-6)
    rates = [drop_path_rate * i / (depth - 1) if depth > 1 else 0.0 for i in range(depth)]
    return nn.ModuleList(
        [Block(width, num_heads, mlp_ratio, qkv_bias=True, drop_path=rate, norm_layer=norm_layer) for rate in rates]
    )


# ---------------------------------------------------------------------------------------------- model
class MAE(Backbone):
    """Masked autoencoder ViT: encoder on visible tokens + cls, decoder with mask tokens over all positions.

    Args:
        input_size: side of the (square) input.
        patch_size: patch side p.
        in_channels: C.
        hidden_size, depth, num_heads: encoder width, blocks and heads.
        decoder_hidden_size, decoder_depth, decoder_num_heads: decoder width, blocks and heads.
        mlp_ratio: MLP width over block width (encoder and decoder).
        drop_path_rate: stochastic depth of the last encoder block, rising linearly from 0 (fine-tuning; 0 in
            pre-training).
        fc_norm: give the average-pool LayerNorm ``fc_norm`` a weight and bias (an official checkpoint fine-tuned with
            ``--global_pool`` has them); ``False``: scale 1, shift 0, no parameters.
    """

    num_prefix_tokens = 1
    num_classes = 0
    output_parts = 1
    block_classes = (Block,)
    hidden_tokens = "drop"

    def __init__(
        self,
        input_size: int = 224,
        patch_size: int = 16,
        in_channels: int = 3,
        hidden_size: int = 1024,
        depth: int = 24,
        num_heads: int = 16,
        decoder_hidden_size: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.0,
        fc_norm: bool = False,
    ) -> None:
        super().__init__()
        for width, heads, part in ((hidden_size, num_heads, "hidden_size"), (decoder_hidden_size, decoder_num_heads, "decoder_hidden_size")):
            if width % heads:
                raise ValueError(f"{part} {width} is not divisible by its number of heads {heads}")
        self.patchifier = Patchifier(input_size, patch_size, in_channels)
        self.hidden_size = hidden_size
        self.decoder_hidden_size = decoder_hidden_size
        values = self.patchifier.values_per_patch
        tokens = self.patchifier.num_tokens

        self.patch_embed = nn.Linear(values, hidden_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, hidden_size))
        self.register_buffer("pos_embed", torch.empty(1, 1 + tokens, hidden_size), persistent=False)
        self.blocks = vit_blocks(hidden_size, depth, num_heads, mlp_ratio, drop_path_rate)
        self.norm = nn.LayerNorm(hidden_size, eps=1e-6)
        self.fc_norm = nn.LayerNorm(hidden_size, eps=1e-6, elementwise_affine=fc_norm)

        self.decoder_embed = nn.Linear(hidden_size, decoder_hidden_size)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_hidden_size))
        self.register_buffer("decoder_pos_embed", torch.empty(1, 1 + tokens, decoder_hidden_size), persistent=False)
        self.decoder_blocks = vit_blocks(decoder_hidden_size, decoder_depth, decoder_num_heads, mlp_ratio)
        self.decoder_norm = nn.LayerNorm(decoder_hidden_size, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_hidden_size, values)
        self.initialize_weights()

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """MAE's init: xavier linears with zero bias, N(0, .02) cls/mask tokens, LayerNorm 1/0, sin-cos positions.

        The patch embedding gets xavier on its weight and keeps the default bias init, as the official Conv2d does.
        """
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm) and module.elementwise_affine:
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        bound = 1 / math.sqrt(self.patch_embed.in_features)
        nn.init.uniform_(self.patch_embed.bias, -bound, bound)
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        if self.pos_embed.device.type != "meta":  # deferred (meta) init: call initialize_weights after to_empty
            self.pos_embed.copy_(position_table(self.hidden_size, self.patchifier.grid))
            self.decoder_pos_embed.copy_(position_table(self.decoder_hidden_size, self.patchifier.grid))

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def global_pool_norm(self) -> nn.LayerNorm:
        """``fc_norm``: the mean of the pre-norm patch tokens ``(B, D)`` goes through it (official ``global_pool``)."""
        return self.fc_norm

    def no_weight_decay(self) -> set[str]:
        """None: the official pre-training weight-decays every tensor of 2+ dims, cls and mask tokens included."""
        return set()

    # ------------------------------------------------------------------------------------------ encoder
    def forward_encoder(self, tokens: torch.Tensor, masking: Masking | None = None, depth: int | None = None) -> torch.Tensor:
        """``tokens (B, N, p*p*C)`` -> cls + visible tokens ``(B, 1 + N_seen, D)`` after ``depth`` blocks
        (``None``: all blocks, then ``norm``). Positions are added before the hidden tokens are dropped."""
        if depth is not None and not 0 <= depth <= self.num_blocks:
            raise ValueError(f"depth {depth} is out of range; this MAE encoder has blocks 0..{self.num_blocks}")
        x = self.patch_embed(tokens) + self.pos_embed[:, 1:].to(tokens.dtype)
        if masking is not None:
            x = gather_tokens(x, masking.ids_keep)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1).to(x.dtype)
        x = torch.cat([cls, x], dim=1)
        for block in self.blocks[:depth]:
            x = self.run_block(block, x)
        return self.norm(x) if depth is None else x

    # ------------------------------------------------------------------------------------------ decoder
    def decoder_input(self, latent: torch.Tensor, masking: Masking | None = None) -> torch.Tensor:
        """Encoder output ``(B, 1 + N_seen, D)`` -> decoder input ``(B, 1 + N, D_dec)``: embedded, ``mask_token`` at
        hidden positions, original order restored, decoder positions added."""
        x = self.decoder_embed(latent)
        cls, visible = x[:, :1], x[:, 1:]
        patches = visible if masking is None else restore_tokens(visible, self.mask_token, masking)
        return torch.cat([cls, patches], dim=1) + self.decoder_pos_embed.to(x.dtype)

    def forward_decoder(self, latent: torch.Tensor, masking: Masking | None = None) -> torch.Tensor:
        """Encoder output ``(B, 1 + N_seen, D)`` -> patch predictions ``(B, N, p*p*C)`` for every position."""
        x = self.decoder_input(latent, masking)
        for block in self.decoder_blocks:
            x = self.run_block(block, x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]

    # ------------------------------------------------------------------------------------------ contract
    @staticmethod
    def _unconditional(t: torch.Tensor | None) -> None:
        if t is not None:
            raise ValueError("MAE is not conditioned on timesteps; pass t=None (use a diffusion backbone for noisy inputs)")

    def forward_features(self, tokens, t=None, y=None, masking: Masking | None = None, depth: int | None = None) -> torch.Tensor:
        """cls + visible encoder tokens ``(B, 1 + N_seen, D)``; ``y`` is ignored (MAE is unconditional)."""
        self._unconditional(t)
        return self.forward_encoder(tokens, masking, depth)

    def forward(self, tokens, t=None, y=None, masking: Masking | None = None) -> torch.Tensor:
        """``tokens (B, N, p*p*C)`` -> ``(B, N, p*p*C)`` predictions at every position (the encoder sees the visible
        tokens only; ``masking=None`` shows it all of them). ``y`` is ignored."""
        self._unconditional(t)
        return self.forward_decoder(self.forward_encoder(tokens, masking), masking)


# ---------------------------------------------------------------------------------------------- sizes
MAE_SIZES = {
    "mae_vit_base_patch16": {"patch_size": 16, "hidden_size": 768, "depth": 12, "num_heads": 12,
                             "decoder_hidden_size": 512, "decoder_depth": 8, "decoder_num_heads": 16},
    "mae_vit_large_patch16": {"patch_size": 16, "hidden_size": 1024, "depth": 24, "num_heads": 16,
                              "decoder_hidden_size": 512, "decoder_depth": 8, "decoder_num_heads": 16},
    "mae_vit_huge_patch14": {"patch_size": 14, "hidden_size": 1280, "depth": 32, "num_heads": 16,
                             "decoder_hidden_size": 512, "decoder_depth": 8, "decoder_num_heads": 16},
    # Small sizes for CPU work (16x16 digits, tests); not in the paper.
    "mae_vit_tiny_patch4": {"input_size": 16, "patch_size": 4, "in_channels": 1, "hidden_size": 192, "depth": 12,
                            "num_heads": 3, "decoder_hidden_size": 128, "decoder_depth": 2, "decoder_num_heads": 4},
    "mae_nano": {"input_size": 8, "patch_size": 2, "in_channels": 1, "hidden_size": 32, "depth": 2, "num_heads": 2,
                 "decoder_hidden_size": 16, "decoder_depth": 1, "decoder_num_heads": 2},
}


def _mae_factory(name: str):
    def build(**overrides) -> MAE:
        return MAE(**{**MAE_SIZES[name], **overrides})

    return build


for _name in MAE_SIZES:
    register_backbone(_name, _mae_factory(_name))
