"""UMD: the unified masked diffusion ViT of Hansen-Estruch et al. (philippe-eecs/small-vision ``models/ae.py:_ViTAE``).

An MAE-style asymmetric autoencoder that is also a diffusion model:

* the encoder sees the visible patch tokens (clean at t = 0, noisy at t >= 1) after learnable positions, with
  ``num_registers`` learnable register tokens in front; it ends with a LayerNorm, and the mean of the registers is
  the representation (``pre_logits``);
* the decoder (as wide as the encoder) puts a shared mask token at the hidden positions, adds its own learnable
  positions, prepends the representation as one token and ends with a LayerNorm (with its own scale and bias when
  ``final_norm_affine``, as the official ``Decoder``), the adaLN final modulation and the per-patch output layer,
  which predicts ``[x0 ‖ ε]`` for every patch;
* both halves are conditioned on the timestep (0 = "no noise"; the corruption offsets diffusion steps by one) and,
  when ``num_classes > 0``, on the class, through adaLN-Zero (``adaln=True``) or as an in-context token prepended
  in every block (``adaln=False``, the paper's MAE baseline).

Layout differences from the JAX module (so the same maths, token layout): the patch embedding is the equivalent
``Linear``, the attention's query/key/value kernels one fused ``qkv`` ``Linear``, and the ``ConvTranspose`` head a
per-token ``Linear`` whose output is ``[x0 tokens ‖ ε tokens]``. big_vision checkpoints import with
:func:`maskdiff.convert.umd.convert_umd_params`. The initialisers and the weight-decay mask are the official ones
(:meth:`UMD.initialize_weights`, :meth:`UMD.decays`).
"""

from __future__ import annotations

import math

import torch
from timm.layers import Attention, Mlp
from torch import nn

from maskdiff.backbones.base import Backbone
from maskdiff.backbones.dit import DiTBlock, modulate
from maskdiff.backbones.embeddings import label_embedder, timestep_frequencies
from maskdiff.backbones.mae import vit_blocks
from maskdiff.backbones.patching import Patchifier
from maskdiff.backbones.registry import register_backbone
from maskdiff.corruption.masking import Masking, gather_tokens, restore_tokens


TRUNCATED_NORMAL_STD = 0.87962566103423978
"""Standard deviation of a standard normal truncated to [-2, 2] (flax's ``variance_scaling`` divides by it)."""


def lecun_normal_(weight: torch.Tensor) -> torch.Tensor:
    """flax's default kernel init on a ``(out, in)`` weight: variance 1/fan_in, a normal truncated at ±2 std."""
    std = 1 / math.sqrt(weight.shape[1]) / TRUNCATED_NORMAL_STD
    return nn.init.trunc_normal_(weight, std=std, a=-2 * std, b=2 * std)


def embedding_trunk(width: int) -> nn.Sequential:
    """UMD's ``EmbeddingTrunk``: Dense(2D) -> SiLU -> Dense(D)."""
    return nn.Sequential(nn.Linear(width, 2 * width), nn.SiLU(), nn.Linear(2 * width, width))


class UMDTimeEmbedder(nn.Module):
    """``(B,)`` timesteps (0 = clean) -> ``(B, D)``: a D-wide sin-first sinusoid, then :func:`embedding_trunk`."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.trunk = embedding_trunk(hidden_size)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        frequencies = timestep_frequencies(t, self.hidden_size, cos_first=False, divisor_shift=1)
        return self.trunk(frequencies.to(self.trunk[0].weight.dtype))


class InContextBlock(nn.Module):
    """A timm ViT block that sees the condition as an extra first token: ``(B, N, D), c (B, D) -> (B, N, D)``."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self.block(torch.cat([c.unsqueeze(1).to(x.dtype), x], dim=1))[:, 1:]


class UMDHead(nn.Module):
    """Final norm (adaLN shift/scale when ``adaln``) and the per-token linear to ``[x0 ‖ ε]``: ``(B, N, D) -> (B, N, out)``.

    ``norm_affine``: the norm has its own scale and bias before the modulation (always without ``adaln``).
    """

    def __init__(self, hidden_size: int, out_features: int, adaln: bool, norm_affine: bool = False) -> None:
        super().__init__()
        self.adaln = adaln
        self.norm = nn.LayerNorm(hidden_size, elementwise_affine=norm_affine or not adaln, eps=1e-6)
        self.linear = nn.Linear(hidden_size, out_features)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size)) if adaln else None

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        if self.adaLN_modulation is not None:
            shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
            x = modulate(x, shift, scale)
        return self.linear(x)


class UMD(Backbone):
    """Unified masked diffusion ViT; ``forward`` returns ``[x0 ‖ ε]`` tokens ``(B, N, 2·p·p·C)``.

    Args:
        input_size: side of the input (pixels, e.g. 64 with patch 4; or latents, e.g. 32 with patch 2).
        patch_size: patch side p.
        in_channels: C.
        hidden_size, depth, num_heads: encoder width, blocks and heads (the decoder has the same width and heads).
        decoder_depth: decoder blocks (UMD: 4 for S/B, 8 for L).
        mlp_ratio: MLP width over block width.
        num_registers: learnable register tokens in front of the encoder tokens; their mean is the representation.
        num_classes: classes for class-conditional training (0 = unconditional, the pre-training default).
        class_dropout_prob: probability of the null class in training (classifier-free guidance).
        adaln: adaLN-Zero conditioning (UMD, DiT-like); ``False`` prepends the condition as an in-context token in
            every block (the paper's MAE baseline).
        label_embedding_std: init std of the class embeddings; ``None``: the official ``nn.Embed`` init, 1/√D
            (DiT uses 0.02; short CPU runs learn the class faster with ~1.0, see the DiT quickstart).
        final_norm_affine: with ``adaln``, the decoder's final LayerNorm has its own scale and bias before the final
            modulation, as the official model (the ImageNet configs); ``False`` (the default, the layout of
            checkpoints saved before this option) is DiT's final layer, a LayerNorm without them.
    """

    output_parts = 2
    takes_timesteps = True
    features_take_timesteps = True
    hidden_tokens = "drop"
    default_pooling = "prefix_mean"

    def __init__(
        self,
        input_size: int = 64,
        patch_size: int = 4,
        in_channels: int = 3,
        hidden_size: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        decoder_depth: int = 4,
        mlp_ratio: float = 4.0,
        num_registers: int = 4,
        num_classes: int = 0,
        class_dropout_prob: float = 0.1,
        adaln: bool = True,
        label_embedding_std: float | None = None,
        final_norm_affine: bool = False,
    ) -> None:
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        if num_registers < 1:
            raise ValueError(f"num_registers must be >= 1 (their mean is the representation), got {num_registers}")
        self.patchifier = Patchifier(input_size, patch_size, in_channels)
        self.hidden_size = hidden_size
        self.num_classes = num_classes
        self.num_prefix_tokens = num_registers
        self.adaln = adaln
        self.label_embedding_std = label_embedding_std
        self.block_classes = (DiTBlock,) if adaln else (InContextBlock,)
        values, tokens = self.patchifier.values_per_patch, self.patchifier.num_tokens

        self.x_embedder = nn.Linear(values, hidden_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens, hidden_size))
        self.registers = nn.Parameter(torch.zeros(1, num_registers, hidden_size))
        self.t_embedder = UMDTimeEmbedder(hidden_size)
        self.y_embedder = label_embedder(num_classes, hidden_size, class_dropout_prob)
        self.y_trunk = embedding_trunk(hidden_size) if num_classes > 0 else None
        self.blocks = self._blocks(depth, num_heads, mlp_ratio)
        self.norm = nn.LayerNorm(hidden_size, eps=1e-6)

        self.mask_token = nn.Parameter(torch.zeros(1, 1, hidden_size))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, tokens, hidden_size))
        self.decoder_blocks = self._blocks(decoder_depth, num_heads, mlp_ratio)
        self.head = UMDHead(hidden_size, self.output_parts * values, adaln, final_norm_affine)
        self.initialize_weights()

    def _blocks(self, depth: int, num_heads: int, mlp_ratio: float) -> nn.ModuleList:
        if self.adaln:
            return nn.ModuleList([DiTBlock(self.hidden_size, num_heads, mlp_ratio, norm_affine=True) for _ in range(depth)])
        return nn.ModuleList([InContextBlock(block) for block in vit_blocks(self.hidden_size, depth, num_heads, mlp_ratio)])

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """The official initialisers (flax defaults where ``models/ae.py`` and ``models/vit.py`` name none):

        * patch embedding and embedding trunks: LeCun normal (a normal of variance 1/fan_in truncated at ±2 std),
          zero bias;
        * attention: Xavier-uniform query, key, value and out kernels, each D x D, zero biases; MLP: Xavier-uniform
          kernels, biases N(0, 1e-6);
        * positions N(0, 1/√N); registers zero; mask token N(0, 0.02); class table N(0, ``label_embedding_std``,
          default 1/√D); adaLN modulations zero (adaLN-Zero); output layer N(0, 0.02), zero bias; LayerNorms 1, 0.
        """
        for module in self.modules():
            if isinstance(module, Attention):
                for kernel in (*module.qkv.weight.chunk(3, dim=0), module.proj.weight):
                    nn.init.xavier_uniform_(kernel)
                nn.init.zeros_(module.qkv.bias)
                nn.init.zeros_(module.proj.bias)
            elif isinstance(module, Mlp):
                for layer in (module.fc1, module.fc2):
                    nn.init.xavier_uniform_(layer.weight)
                    nn.init.normal_(layer.bias, std=1e-6)
        for layer in (self.x_embedder, *self.trunks()):
            lecun_normal_(layer.weight)
            nn.init.zeros_(layer.bias)
        std = 1 / math.sqrt(self.patchifier.num_tokens)
        nn.init.normal_(self.pos_embed, std=std)
        nn.init.normal_(self.decoder_pos_embed, std=std)
        nn.init.zeros_(self.registers)
        nn.init.normal_(self.mask_token, std=0.02)
        nn.init.normal_(self.head.linear.weight, std=0.02)
        nn.init.zeros_(self.head.linear.bias)
        if self.y_embedder is not None:
            label_std = self.label_embedding_std if self.label_embedding_std is not None else 1 / math.sqrt(self.hidden_size)
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=label_std)
        for module in self.modules():
            modulation = getattr(module, "adaLN_modulation", None)
            if modulation is not None:
                nn.init.zeros_(modulation[-1].weight)
                nn.init.zeros_(modulation[-1].bias)

    def trunks(self) -> list[nn.Linear]:
        """The Dense layers of the time and label embedding trunks."""
        trunks = [self.t_embedder.trunk] + ([self.y_trunk] if self.y_trunk is not None else [])
        return [layer for trunk in trunks for layer in trunk if isinstance(layer, nn.Linear)]

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def no_weight_decay(self) -> set[str]:
        """The register (cls) tokens and the mask embedding (see :meth:`decays`)."""
        return {"registers", "mask_token"}

    def decays(self, name: str, parameter: nn.Parameter) -> bool:
        """big_vision's mask: only ``no_decay_list`` (``cls``, ``image_mask_embedding``, biases) goes undecayed, so
        LayerNorm scales, positions and the class table are decayed."""
        return name not in self.no_weight_decay() and not name.endswith("bias")

    def condition(self, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """``c = t_emb + y_emb`` ``(B, D)``; ``y=None`` gives the null class of a conditional model."""
        c = self.t_embedder(t)
        if self.y_embedder is None:
            return c
        if y is None:
            if self.y_embedder.dropout_prob <= 0:
                raise ValueError("this model was built without a null class (class_dropout_prob=0); pass labels y")
            y = torch.full((t.shape[0],), self.num_classes, dtype=torch.long, device=t.device)
        return c + self.y_trunk(self.y_embedder(y))

    # ------------------------------------------------------------------------------------------ encoder
    def _encode(self, tokens, t, y, masking, depth=None) -> tuple[torch.Tensor, torch.Tensor]:
        if t is None:
            raise ValueError("UMD needs timesteps t of shape (B,): 0 for clean inputs, diffusion step + 1 for noisy ones")
        if depth is not None and not 0 <= depth <= self.num_blocks:
            raise ValueError(f"depth {depth} is out of range; this UMD encoder has blocks 0..{self.num_blocks}")
        c = self.condition(t, y)
        x = self.x_embedder(tokens) + self.pos_embed.to(tokens.dtype)
        if masking is not None:
            x = gather_tokens(x, masking.ids_keep)
        x = torch.cat([self.registers.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        for block in self.blocks[:depth]:
            x = self.run_block(block, x, c)
        return (self.norm(x) if depth is None else x), c

    def forward_features(self, tokens, t=None, y=None, masking: Masking | None = None, depth: int | None = None) -> torch.Tensor:
        """Registers + visible encoder tokens ``(B, num_registers + N_seen, D)``; probe with t = 0 (clean), no mask,
        pooling ``prefix_mean`` (the paper's ``pre_logits``)."""
        return self._encode(tokens, t, y, masking, depth)[0]

    # ------------------------------------------------------------------------------------------ decoder
    def forward(self, tokens, t=None, y=None, masking: Masking | None = None) -> torch.Tensor:
        """``tokens (B, N, p·p·C)``, ``t (B,)`` (0 = clean), ``y (B,)`` -> ``[x0 ‖ ε]`` ``(B, N, 2·p·p·C)``."""
        encoded, c = self._encode(tokens, t, y, masking)
        registers, patches = encoded[:, : self.num_prefix_tokens], encoded[:, self.num_prefix_tokens :]
        if masking is not None:
            patches = restore_tokens(patches, self.mask_token, masking)
        x = patches + self.decoder_pos_embed.to(patches.dtype)
        x = torch.cat([registers.mean(dim=1, keepdim=True), x], dim=1)
        for block in self.decoder_blocks:
            x = self.run_block(block, x, c)
        return self.head(x[:, 1:], c)


# ---------------------------------------------------------------------------------------------- sizes
UMD_SIZES = {
    "L": dict(hidden_size=1024, depth=24, num_heads=16, decoder_depth=8),
    "B": dict(hidden_size=768, depth=12, num_heads=12, decoder_depth=4),
    "S": dict(hidden_size=384, depth=12, num_heads=6, decoder_depth=4),
    # Small sizes for CPU work (digits, tests); not in the paper.
    "T": dict(hidden_size=192, depth=6, num_heads=3, decoder_depth=2),
    "Nano": dict(hidden_size=32, depth=2, num_heads=2, decoder_depth=1),
}


def _umd_factory(size: str, patch: int):
    def build(**overrides) -> UMD:
        return UMD(**{**UMD_SIZES[size], "patch_size": patch, **overrides})

    return build


for _size in UMD_SIZES:
    for _patch in (2, 4, 8, 16):
        register_backbone(f"UMD-{_size}/{_patch}", _umd_factory(_size, _patch))
