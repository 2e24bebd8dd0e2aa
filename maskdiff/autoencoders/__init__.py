"""Autoencoders map data to the space the diffusion runs in: identity for pixels, a frozen VAE for latents."""

from maskdiff.autoencoders.base import Autoencoder, PixelSpace
from maskdiff.autoencoders.vae import StableDiffusionVAE

__all__ = ["Autoencoder", "PixelSpace", "StableDiffusionVAE"]
