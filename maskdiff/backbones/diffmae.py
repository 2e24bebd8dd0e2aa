"""DiffMAE: diffusion models as masked autoencoders (Wei et al., ICCV 2023), for images and video.

No official code exists (see ``docs/diffmae.md``); what the paper states is kept, the rest is
an option:

* the encoder is an MAE ViT (cls token, fixed sin-cos positions; space-time ``sincos_3d`` for video tubelets) that
  sees **only the clean visible tokens**;
* the decoder receives the **noisy hidden tokens** (linearly embedded, decoder positions, timestep conditioning) and
  predicts their clean pixels (x0);
* ``decoder``: ``joint`` (MAE-style: embedded encoder tokens and noisy tokens together under full self-attention),
  ``cross`` (the noisy tokens cross-attend to encoder features, no self-attention among them) or ``cross_self``
  (cross-attention, then self-attention, then the MLP in every block). Which one the paper's headline numbers use
  is unverified; ``cross_self`` is the default as the design drawn in its Fig. 3;
* ``top_down`` (cross variants): decoder block ``i`` of ``L_dec`` reads the output of encoder block
  ``L_enc - 1 - floor(i · L_enc / L_dec)``: the first decoder block the deepest features, later ones shallower ones
  (reversed depth, as the U-shaped unofficial kny5265/diffmae-pytorch with ``L_dec = L_enc``). Without it every
  decoder block reads the encoder's final (normed) output;
* ``t_conditioning``: ``add`` (the timestep embedding is added to every noisy token; the default, since the paper's
  mechanism is unverified) or ``adaln`` (adaLN-Zero shift/scale/gate of every decoder sub-layer, DiT-style).

The encoder is never conditioned on the timestep (``features_take_timesteps = False``: probes call
:meth:`DiffMAE.forward_features` without one). For inpainting, :meth:`DiffMAE.encode_context` runs the encoder once
and :meth:`DiffMAE.decode_hidden` runs only the decoder on the hidden tokens at every reverse step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from timm.layers import Attention, Mlp
from timm.models.vision_transformer import Block
from torch import nn

from maskdiff.backbones.base import Backbone
from maskdiff.backbones.dit import modulate
from maskdiff.backbones.embeddings import TimestepEmbedder, sincos_2d, sincos_3d
from maskdiff.backbones.mae import vit_blocks
from maskdiff.backbones.patching import Patchifier
from maskdiff.backbones.registry import register_backbone
from maskdiff.corruption.masking import Masking, gather_tokens

DecoderKind = Literal["joint", "cross", "cross_self"]
DECODERS = ("joint", "cross", "cross_self")
T_CONDITIONINGS = ("add", "adaln")


def position_table(dim: int, grid: tuple[int, ...]) -> torch.Tensor:
    """Fixed sin-cos positions with a zero cls row: ``(1, 1 + prod(grid), dim)``; 2-D for ``(h, w)`` grids,
    space-time (:func:`sincos_3d`: the first quarter of the dims encode the frame, the rest the spatial cell) for
    ``(t, h, w)`` grids."""
    if len(grid) == 2:
        if grid[0] != grid[1]:
            raise ValueError(f"sin-cos positions need a square token grid, got {grid}")
        table = sincos_2d(dim, grid[0])
    else:
        table = sincos_3d(dim, grid)
    return torch.cat([torch.zeros(1, dim), torch.from_numpy(table).float()]).unsqueeze(0)


def hidden_ids(masking: Masking) -> torch.Tensor:
    """``(B, N - K)`` indices of the hidden tokens, in the masking's shuffle order (after the kept ones)."""
    return torch.argsort(masking.ids_restore, dim=1)[:, masking.num_keep :]


def all_hidden(batch: int, num_tokens: int, device) -> Masking:
    """A masking that hides every token: the encoder sees only its cls token."""
    order = torch.arange(num_tokens, device=device).expand(batch, -1)
    return Masking(
        mask=torch.ones(batch, num_tokens, dtype=torch.bool, device=device),
        ids_keep=order[:, :0],
        ids_restore=order,
    )


class CrossAttention(nn.Module):
    """Multi-head attention of queries ``(B, M, D)`` over a context ``(B, K, D)`` -> ``(B, M, D)``."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by its number of heads {num_heads}")
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, m, d = x.shape
        heads = self.num_heads
        q = self.q(x).view(b, m, heads, d // heads).transpose(1, 2)
        k, v = self.kv(context).view(b, context.shape[1], 2, heads, d // heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v)
        return self.proj(attended.transpose(1, 2).reshape(b, m, d))


class DiffMAEDecoderBlock(nn.Module):
    """Pre-norm residual block: [cross-attention to a context] -> [self-attention] -> MLP.

    ``forward(x (B, M, D), context (B, K, D) | None, c (B, D) | None) -> (B, M, D)``. With ``adaln`` each sub-layer's
    normed input is shifted/scaled and its output gated by a zero-initialised projection of ``c`` (adaLN-Zero).
    """

    def __init__(self, width: int, num_heads: int, mlp_ratio: float, cross_attention: bool, self_attention: bool,
                 adaln: bool) -> None:
        super().__init__()
        if not (cross_attention or self_attention):
            raise ValueError("a decoder block needs cross-attention, self-attention or both")

        def norm() -> nn.LayerNorm:
            return nn.LayerNorm(width, eps=1e-6, elementwise_affine=not adaln)

        self.cross_norm = norm() if cross_attention else None
        self.cross_attn = CrossAttention(width, num_heads) if cross_attention else None
        self.self_norm = norm() if self_attention else None
        self.self_attn = Attention(width, num_heads, qkv_bias=True) if self_attention else None
        self.mlp_norm = norm()
        self.mlp = Mlp(width, int(width * mlp_ratio), act_layer=nn.GELU)
        self.num_sublayers = int(cross_attention) + int(self_attention) + 1
        self.adaLN_modulation = (
            nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * self.num_sublayers * width)) if adaln else None
        )

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, c: torch.Tensor | None = None) -> torch.Tensor:
        if self.adaLN_modulation is not None:
            if c is None:
                raise ValueError("an adaLN decoder block needs the timestep condition c (B, D)")
            modulations = list(self.adaLN_modulation(c).chunk(3 * self.num_sublayers, dim=1))
        else:
            modulations = None

        def residual(x: torch.Tensor, norm: nn.Module, layer) -> torch.Tensor:
            h = norm(x)
            if modulations is None:
                return x + layer(h)
            shift, scale, gate = modulations.pop(0), modulations.pop(0), modulations.pop(0)
            return x + gate.unsqueeze(1) * layer(modulate(h, shift, scale))

        if self.cross_attn is not None:
            if context is None:
                raise ValueError("a cross-attention decoder block needs the encoder context (B, K, D)")
            x = residual(x, self.cross_norm, lambda h: self.cross_attn(h, context))
        if self.self_attn is not None:
            x = residual(x, self.self_norm, self.self_attn)
        return residual(x, self.mlp_norm, self.mlp)


@dataclass
class EncoderContext:
    """The encoder's output as the decoder reads it, computed once per masking.

    Attributes:
        contexts: per decoder block (cross variants) or one (joint) ``(B, 1 + K, D_dec)`` tensors: cls + visible
            encoder tokens projected to the decoder width.
        masking: the masking the encoder ran with.
    """

    contexts: list[torch.Tensor]
    masking: Masking


class DiffMAE(Backbone):
    """DiffMAE ViT: encoder on clean visible tokens (+ cls), decoder denoising the hidden tokens to x0.

    ``forward(tokens (B, N, P), t (B,), y, masking) -> (B, N, P)``: x0 predictions at the hidden positions and
    **zeros at the visible ones** (they are given, not predicted). ``tokens`` hold clean visible and noisy hidden
    tokens (:class:`~maskdiff.corruption.MaskedPatchNoise`); ``masking=None`` hides every token (the encoder sees
    only cls: unconditional generation). ``y`` is ignored (unconditional).

    Args:
        input_size: spatial side of the (square) input.
        patch_size: patch side p.
        in_channels: C.
        num_frames: frames of a video clip (``None`` for images); tokens are tubelets ``tubelet × p × p``.
        tubelet: frames per token (video).
        hidden_size, depth, num_heads: encoder width, blocks, heads.
        decoder_hidden_size, decoder_depth, decoder_num_heads: decoder width, blocks, heads.
        mlp_ratio: MLP width over block width.
        decoder: ``joint``, ``cross`` or ``cross_self`` (module docstring; default unverified).
        top_down: cross variants only: decoder blocks read encoder blocks in reversed depth; ``None`` = on for the
            cross variants (``True`` with ``joint`` is an error).
        t_conditioning: ``add`` (timestep embedding added to the noisy tokens) or ``adaln``.
        drop_path_rate: encoder stochastic depth (fine-tuning; 0 in pre-training).
    """

    num_prefix_tokens = 1
    num_classes = 0
    output_parts = 1
    takes_timesteps = True
    features_take_timesteps = False
    hidden_tokens = "noised"

    def __init__(
        self,
        input_size: int = 224,
        patch_size: int = 16,
        in_channels: int = 3,
        num_frames: int | None = None,
        tubelet: int = 1,
        hidden_size: int = 1024,
        depth: int = 24,
        num_heads: int = 16,
        decoder_hidden_size: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        mlp_ratio: float = 4.0,
        decoder: DecoderKind = "cross_self",
        top_down: bool | None = None,
        t_conditioning: Literal["add", "adaln"] = "add",
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if decoder not in DECODERS:
            raise ValueError(f"unknown decoder {decoder!r}; expected one of {', '.join(map(repr, DECODERS))}")
        if t_conditioning not in T_CONDITIONINGS:
            raise ValueError(f"unknown t_conditioning {t_conditioning!r}; expected one of {', '.join(map(repr, T_CONDITIONINGS))}")
        if decoder == "joint" and top_down:
            raise ValueError("top_down connects decoder blocks to encoder blocks by cross-attention; "
                             "the joint decoder has none (use decoder 'cross' or 'cross_self', or top_down false)")
        if num_frames is not None and not 0 < tubelet <= num_frames:
            raise ValueError(f"clip length {num_frames} is shorter than the tubelet {tubelet}; expected num_frames >= tubelet >= 1")
        for width, heads, part in ((hidden_size, num_heads, "hidden_size"), (decoder_hidden_size, decoder_num_heads, "decoder_hidden_size")):
            if width % heads:
                raise ValueError(f"{part} {width} is not divisible by its number of heads {heads}")
        if depth < 1 or decoder_depth < 1:
            raise ValueError(f"depth {depth} and decoder_depth {decoder_depth} must both be at least 1")
        self.patchifier = Patchifier(input_size, patch_size, in_channels, num_frames, tubelet)
        self.hidden_size = hidden_size
        self.decoder_hidden_size = decoder_hidden_size
        self.decoder = decoder
        self.top_down = decoder != "joint" if top_down is None else top_down
        self.t_conditioning = t_conditioning
        values, tokens = self.patchifier.values_per_patch, self.patchifier.num_tokens
        adaln = t_conditioning == "adaln"

        self.patch_embed = nn.Linear(values, hidden_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, hidden_size))
        self.register_buffer("pos_embed", torch.empty(1, 1 + tokens, hidden_size), persistent=False)
        self.blocks = vit_blocks(hidden_size, depth, num_heads, mlp_ratio, drop_path_rate)
        self.norm = nn.LayerNorm(hidden_size, eps=1e-6)

        num_contexts = 1 if decoder == "joint" else decoder_depth
        self.context_embed = nn.ModuleList(
            [nn.Sequential(nn.LayerNorm(hidden_size, eps=1e-6), nn.Linear(hidden_size, decoder_hidden_size))
             for _ in range(num_contexts)]
        )
        self.noisy_embed = nn.Linear(values, decoder_hidden_size)
        self.register_buffer("decoder_pos_embed", torch.empty(1, 1 + tokens, decoder_hidden_size), persistent=False)
        self.t_embedder = TimestepEmbedder(decoder_hidden_size)
        self.decoder_blocks = nn.ModuleList([
            DiffMAEDecoderBlock(decoder_hidden_size, decoder_num_heads, mlp_ratio,
                                cross_attention=decoder != "joint", self_attention=decoder != "cross", adaln=adaln)
            for _ in range(decoder_depth)
        ])
        self.decoder_norm = nn.LayerNorm(decoder_hidden_size, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_hidden_size, values)
        self.block_classes = (Block, DiffMAEDecoderBlock)
        self.initialize_weights()

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """MAE's init (xavier linears, zero biases, N(0, .02) cls, LayerNorm 1/0, sin-cos positions) and zero
        adaLN modulations (adaLN-Zero)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm) and module.elementwise_affine:
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.cls_token, std=0.02)
        for block in self.decoder_blocks:
            if block.adaLN_modulation is not None:
                nn.init.zeros_(block.adaLN_modulation[-1].weight)
                nn.init.zeros_(block.adaLN_modulation[-1].bias)
        if self.pos_embed.device.type != "meta":
            self.pos_embed.copy_(position_table(self.hidden_size, self.patchifier.grid))
            self.decoder_pos_embed.copy_(position_table(self.decoder_hidden_size, self.patchifier.grid))

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def context_layers(self) -> list[int | None]:
        """Encoder block whose output each context reads (``None``: the final, normed output)."""
        if not self.top_down:
            return [None] * len(self.context_embed)
        depth, decoder_depth = self.num_blocks, len(self.decoder_blocks)
        return [depth - 1 - (i * depth) // decoder_depth for i in range(decoder_depth)]

    # ------------------------------------------------------------------------------------------ encoder
    def forward_encoder(self, tokens: torch.Tensor, masking: Masking | None = None, depth: int | None = None,
                        keep_blocks: bool = False) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``tokens (B, N, P)`` -> (cls + visible tokens ``(B, 1 + K, D)`` after ``depth`` blocks (``None``: all,
        then ``norm``), every block's output when ``keep_blocks``). Only the tokens ``masking`` keeps are read."""
        if depth is not None and not 0 <= depth <= self.num_blocks:
            raise ValueError(f"depth {depth} is out of range; this DiffMAE encoder has blocks 0..{self.num_blocks}")
        visible = tokens if masking is None else gather_tokens(tokens, masking.ids_keep)
        positions = self.pos_embed[:, 1:].expand(tokens.shape[0], -1, -1)
        if masking is not None:
            positions = gather_tokens(positions, masking.ids_keep)
        x = self.patch_embed(visible) + positions.to(visible.dtype)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1).to(x.dtype)
        x = torch.cat([cls, x], dim=1)
        outputs = []
        for block in self.blocks[:depth]:
            x = self.run_block(block, x)
            if keep_blocks:
                outputs.append(x)
        return (self.norm(x) if depth is None else x), outputs

    def forward_features(self, tokens, t=None, y=None, masking: Masking | None = None, depth: int | None = None) -> torch.Tensor:
        """cls + visible encoder tokens ``(B, 1 + N_seen, D)`` (MAE's features); ``t`` and ``y`` are ignored: the
        encoder only ever sees clean tokens."""
        return self.forward_encoder(tokens, masking, depth)[0]

    def encode_context(self, tokens: torch.Tensor, masking: Masking) -> EncoderContext:
        """Run the encoder once on the tokens ``masking`` keeps: the decoder's context (:class:`EncoderContext`)."""
        final, outputs = self.forward_encoder(tokens, masking, keep_blocks=self.top_down)
        contexts = [embed(final if layer is None else outputs[layer])
                    for embed, layer in zip(self.context_embed, self.context_layers())]
        return EncoderContext(contexts=contexts, masking=masking)

    # ------------------------------------------------------------------------------------------ decoder
    def decode_hidden(self, context: EncoderContext, noisy: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Noisy hidden tokens ``(B, M, P)`` (in :func:`hidden_ids` order) at timesteps ``t (B,)`` -> x0 predictions
        ``(B, M, P)``, conditioned on the cached encoder ``context``."""
        masking = context.masking
        ids = hidden_ids(masking)
        if noisy.shape[1] != ids.shape[1]:
            raise ValueError(f"got {noisy.shape[1]} noisy tokens but the masking hides {ids.shape[1]}")
        t_embedding = self.t_embedder(t)
        x = self.noisy_embed(noisy)
        if self.t_conditioning == "add":
            x = x + t_embedding.unsqueeze(1).to(x.dtype)
        c = t_embedding if self.t_conditioning == "adaln" else None
        positions = self.decoder_pos_embed.to(x.dtype)
        if self.decoder == "joint":
            encoded = context.contexts[0]
            patches = gather_tokens(torch.cat([encoded[:, 1:], x], dim=1), masking.ids_restore) + positions[:, 1:]
            x = torch.cat([encoded[:, :1] + positions[:, :1], patches], dim=1)
            for block in self.decoder_blocks:
                x = self.run_block(block, x, None, c)
            x = gather_tokens(x[:, 1:], ids)
        else:
            x = x + gather_tokens(positions[:, 1:].expand(x.shape[0], -1, -1), ids)
            for block, encoded in zip(self.decoder_blocks, context.contexts):
                x = self.run_block(block, x, encoded, c)
        return self.decoder_pred(self.decoder_norm(x))

    def forward(self, tokens, t=None, y=None, masking: Masking | None = None) -> torch.Tensor:
        """``tokens (B, N, P)``, ``t (B,)`` -> ``(B, N, P)``: x0 at the hidden positions, zeros at the visible ones."""
        if t is None:
            raise ValueError("DiffMAE's decoder needs the timesteps t (B,) of its noisy hidden tokens")
        if masking is None:
            masking = all_hidden(tokens.shape[0], tokens.shape[1], tokens.device)
        context = self.encode_context(tokens, masking)
        predicted = self.decode_hidden(context, gather_tokens(tokens, hidden_ids(masking)), t)
        visible = predicted.new_zeros(tokens.shape[0], masking.num_keep, predicted.shape[-1])
        return gather_tokens(torch.cat([visible, predicted], dim=1), masking.ids_restore)


# ---------------------------------------------------------------------------------------------- sizes
DIFFMAE_SIZES = {
    "diffmae_vit_base_patch16": {"patch_size": 16, "hidden_size": 768, "depth": 12, "num_heads": 12,
                                 "decoder_hidden_size": 512, "decoder_depth": 8, "decoder_num_heads": 16},
    "diffmae_vit_large_patch16": {"patch_size": 16, "hidden_size": 1024, "depth": 24, "num_heads": 16,
                                  "decoder_hidden_size": 512, "decoder_depth": 8, "decoder_num_heads": 16},
    "diffmae_vit_large_patch16_video": {"patch_size": 16, "num_frames": 16, "tubelet": 2, "hidden_size": 1024,
                                        "depth": 24, "num_heads": 16, "decoder_hidden_size": 512, "decoder_depth": 8,
                                        "decoder_num_heads": 16},
    # Small sizes for CPU work (16x16 digits, moving digits, tests); not in the paper.
    "diffmae_vit_tiny_patch4": {"input_size": 16, "patch_size": 4, "in_channels": 1, "hidden_size": 128, "depth": 4,
                                "num_heads": 4, "decoder_hidden_size": 128, "decoder_depth": 2, "decoder_num_heads": 4},
    "diffmae_nano": {"input_size": 8, "patch_size": 2, "in_channels": 1, "hidden_size": 32, "depth": 2, "num_heads": 2,
                     "decoder_hidden_size": 32, "decoder_depth": 2, "decoder_num_heads": 2},
}


def _diffmae_factory(name: str):
    def build(**overrides) -> DiffMAE:
        return DiffMAE(**{**DIFFMAE_SIZES[name], **overrides})

    return build


for _name in DIFFMAE_SIZES:
    register_backbone(_name, _diffmae_factory(_name))
