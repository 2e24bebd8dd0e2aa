"""The Autoencoder contract (frozen; never part of a checkpoint)."""

from __future__ import annotations

import torch


class Autoencoder:
    """``encode (B, C, H, W) -> (B, C', H/f, W/f)`` and ``decode`` back; frozen and kept out of checkpoints.

    Attributes:
        downsample: spatial factor f.
        latent_channels: C' (``None`` = same as the data's channels).
        scale_factor: the factor latents are multiplied by after encoding (``None``: none, e.g. pixels).
    """

    downsample: int = 1
    latent_channels: int | None = None
    scale_factor: float | None = None

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class PixelSpace(Autoencoder):
    """Identity: the diffusion runs on pixels in [-1, 1]."""

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return images

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents
