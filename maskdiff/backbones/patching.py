"""Patchify / unpatchify between images (or videos) and tokens.

Token layout (the order of the official MAE/DiT checkpoints): tokens are row-major over the patch grid
(h, w) (video: (t, h, w)); inside a token the values run (p_row, p_col, channel) (video:
(p_time, p_row, p_col, channel)) with the channel fastest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from einops import rearrange


@dataclass(frozen=True)
class Patchifier:
    """Converts between pixel (or latent) arrays and patch tokens.

    Args:
        input_size: spatial side of the (square) input, e.g. 32 for 256-px images in SD-VAE latents.
        patch_size: side of a square patch.
        channels: channels of the input.
        frames: frames of a video clip; ``None`` for images.
        tubelet: frames per patch for video (tube patches ``tubelet × p × p``).
    """

    input_size: int
    patch_size: int
    channels: int
    frames: int | None = None
    tubelet: int = 1

    def __post_init__(self) -> None:
        if self.patch_size <= 0 or self.input_size % self.patch_size:
            raise ValueError(
                f"input size {self.input_size} is not divisible by patch size {self.patch_size}; "
                "expected an input size that is a multiple of the patch size"
            )
        if self.frames is not None and self.frames % self.tubelet:
            raise ValueError(
                f"clip length {self.frames} is not divisible by tubelet {self.tubelet}; "
                "expected a number of frames that is a multiple of the tubelet size"
            )

    @property
    def grid(self) -> tuple[int, ...]:
        """Patch grid: ``(h, w)`` for images, ``(t, h, w)`` for video."""
        side = self.input_size // self.patch_size
        if self.frames is None:
            return (side, side)
        return (self.frames // self.tubelet, side, side)

    @property
    def num_tokens(self) -> int:
        return math.prod(self.grid)

    @property
    def values_per_patch(self) -> int:
        """Pixels per patch times channels: the token width ``P``."""
        return self.tubelet * self.patch_size**2 * self.channels

    @property
    def pixels_per_patch(self) -> int:
        return self.tubelet * self.patch_size**2

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """Shape of one input: ``(C, H, W)`` or ``(C, T, H, W)``."""
        if self.frames is None:
            return (self.channels, self.input_size, self.input_size)
        return (self.channels, self.frames, self.input_size, self.input_size)

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` or ``(B, C, T, H, W)`` -> ``(B, N, P)``."""
        if tuple(x.shape[1:]) != self.sample_shape:
            raise ValueError(f"expected inputs of shape (B, {', '.join(map(str, self.sample_shape))}), got {tuple(x.shape)}")
        p = self.patch_size
        if self.frames is None:
            return rearrange(x, "b c (h p) (w q) -> b (h w) (p q c)", p=p, q=p)
        return rearrange(x, "b c (t u) (h p) (w q) -> b (t h w) (u p q c)", u=self.tubelet, p=p, q=p)

    def unpatchify(self, tokens: torch.Tensor, channels: int | None = None) -> torch.Tensor:
        """``(B, N, P)`` -> ``(B, C, H, W)`` or ``(B, C, T, H, W)``; ``channels`` overrides C (e.g. 2C outputs)."""
        c = channels or self.channels
        p = self.patch_size
        if self.frames is None:
            h, w = self.grid
            return rearrange(tokens, "b (h w) (p q c) -> b c (h p) (w q)", h=h, w=w, p=p, q=p, c=c)
        t, h, w = self.grid
        return rearrange(
            tokens, "b (t h w) (u p q c) -> b c (t u) (h p) (w q)", t=t, h=h, w=w, u=self.tubelet, p=p, q=p, c=c
        )

    def channel_view(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(B, N, P)`` -> ``(B, N, pixels_per_patch, C)``: a view with the channel as its own axis."""
        return tokens.unflatten(-1, (self.pixels_per_patch, -1))
