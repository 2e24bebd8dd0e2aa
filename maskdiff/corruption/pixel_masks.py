"""Pixel masks (True = generate) checked against images and pooled onto a backbone's token grid.

A token is generated when any of its pixels is: :func:`token_mask` max-pools the pixel mask over the pixels a token
covers (autoencoder downsample × patch size; video: also the tubelet's frames).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def as_pixel_mask(pixel_mask: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """``(B|1, 1, H, W)``, ``(B|1, H, W)`` or ``(H, W)`` mask -> ``(B, 1, H, W)`` bool for ``images (B, C, H, W)``."""
    batch, _, height, width = images.shape
    mask = pixel_mask.bool()
    if mask.ndim == 2:
        mask = mask[None]
    if mask.ndim == 3:
        mask = mask[:, None]
    if mask.ndim != 4 or mask.shape[1] != 1 or tuple(mask.shape[-2:]) != (height, width) or mask.shape[0] not in (1, batch):
        raise ValueError(
            f"pixel mask of shape {tuple(pixel_mask.shape)} does not fit images of shape {tuple(images.shape)}; "
            f"expected ({batch}, 1, {height}, {width}) or ({batch}, {height}, {width}), True = generate"
        )
    return mask.expand(batch, 1, height, width).to(images.device)


def token_mask(pixel_mask: torch.Tensor, token_pixels: int, tubelet: int | None = None) -> torch.Tensor:
    """Pixel mask -> ``(B, N)`` bool over the row-major token grid: a token is generated (True) if any of its pixels
    is. Images: ``(B, 1, H, W)`` or ``(B, H, W)``, tokens of ``token_pixels``-side squares. Video (``tubelet`` given):
    ``(B, F, S, S)`` or ``(F, S, S)``, tokens of ``tubelet × token_pixels × token_pixels`` over a ``(t, h, w)`` grid."""
    if tubelet is None:
        mask, window = (pixel_mask if pixel_mask.ndim == 4 else pixel_mask.unsqueeze(1)), (token_pixels, token_pixels)
    else:
        mask = (pixel_mask if pixel_mask.ndim == 4 else pixel_mask.unsqueeze(0)).unsqueeze(1)
        window = (tubelet, token_pixels, token_pixels)
    sizes = mask.shape[2:]
    if any(size % step for size, step in zip(sizes, window)):
        unit = "frames x pixels x pixels" if tubelet is not None else "pixels"
        raise ValueError(f"a {'x'.join(map(str, sizes))} mask does not split into tokens of "
                         f"{'x'.join(map(str, window))} {unit}")
    pool = F.max_pool2d if tubelet is None else F.max_pool3d
    return pool(mask.float(), window).flatten(1).bool()
