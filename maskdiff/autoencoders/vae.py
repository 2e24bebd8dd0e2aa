"""A frozen diffusers ``AutoencoderKL`` (the SD VAE that DiT/MDT use), loaded from a local directory."""

from __future__ import annotations

from pathlib import Path

import torch

from maskdiff.autoencoders.base import Autoencoder


class StableDiffusionVAE(Autoencoder):
    """``z = scale · vae.encode(x).latent_dist.sample()`` (or its mean); decode divides by ``scale``.

    Args:
        path: local directory written by ``AutoencoderKL.save_pretrained`` (e.g. a copy of
            ``stabilityai/sd-vae-ft-ema``); clusters are often offline, so nothing is downloaded.
        scale_factor: latent scale (0.18215 for the SD VAE).
        sample: draw from the posterior (DiT's training) instead of taking its mean.
    """

    downsample = 8

    def __init__(self, path: str, scale_factor: float = 0.18215, sample: bool = True) -> None:
        directory = Path(path).expanduser()
        if not (directory / "config.json").is_file():
            raise FileNotFoundError(
                f"no VAE at {directory}: expected a directory with config.json and weights written by "
                "diffusers' AutoencoderKL.save_pretrained (download e.g. stabilityai/sd-vae-ft-ema on a machine "
                "with network access and copy it here)"
            )
        try:
            from diffusers import AutoencoderKL
        except ImportError as error:
            raise ImportError("StableDiffusionVAE needs diffusers: pip install 'maskdiff[latent]'") from error
        self.path = str(directory)
        self.scale_factor = scale_factor
        self.sample = sample
        self.vae = AutoencoderKL.from_pretrained(self.path, local_files_only=True).eval().requires_grad_(False)
        self.latent_channels = self.vae.config.latent_channels
        self.downsample = 2 ** (len(self.vae.config.block_out_channels) - 1)

    def _on(self, x: torch.Tensor):
        if next(self.vae.parameters()).device != x.device:
            self.vae.to(x.device)
        return self.vae

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        posterior = self._on(images).encode(images).latent_dist
        return (posterior.sample() if self.sample else posterior.mean) * self.scale_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self._on(latents).decode(latents / self.scale_factor).sample
