"""Inpainting masks: load one from a PNG or make one (random patches, box, half, outpaint border, a masker's tokens).

Convention: a pixel mask is bool, **True = generate** (the same sense as the sampler's token ``mask``).
A token is generated when any of its pixels is (:func:`maskdiff.corruption.pixel_masks.token_mask`).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from maskdiff.corruption.maskers import Masker

MASK_KINDS = ("random", "box", "half", "outpaint")
SIDES = ("left", "right", "top", "bottom")


def fit_square(image: Image.Image, size: int, resample: Image.Resampling) -> Image.Image:
    """Centre-crop ``image`` to a square and resize it to ``size × size`` (the data pipeline's geometry)."""
    width, height = image.size
    if width != height:
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        image = image.crop((left, top, left + side, top + side))
    if image.size != (size, size):
        image = image.resize((size, size), resample)
    return image


def check_ratio(ratio: float) -> float:
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"mask ratio {ratio} is outside (0, 1); expected the share of the image to generate, e.g. 0.75")
    return ratio


def load_mask(path: str | Path, size: int, source_size: tuple[int, int] | None = None) -> torch.Tensor:
    """A mask PNG (white / nonzero = generate) as ``(size, size)`` bool.

    The mask goes through the image's geometry (centre crop, then a nearest resize), so a mask drawn on the
    source image of ``source_size (width, height)`` stays aligned with it; it must have the source's aspect ratio.
    """
    path = Path(path).expanduser()
    try:
        with Image.open(path) as opened:
            mask = opened.convert("L")
    except (FileNotFoundError, UnidentifiedImageError, OSError) as error:
        raise ValueError(f"cannot read mask {path}: {error}; expected a PNG with white (nonzero) pixels to generate") from error
    if source_size is not None and mask.size[0] * source_size[1] != mask.size[1] * source_size[0]:
        raise ValueError(
            f"mask {path} is {mask.size[0]}x{mask.size[1]} (width x height) but the image is "
            f"{source_size[0]}x{source_size[1]}; expected a mask of the image's size or aspect ratio"
        )
    pixels = torch.from_numpy(np.array(fit_square(mask, size, Image.Resampling.NEAREST)) > 0)
    if not pixels.any():
        raise ValueError(
            f"mask {path} ({mask.size[0]}x{mask.size[1]}) marks no pixel to generate at the model's {size}x{size}; "
            "expected white (nonzero) pixels where the image should be generated"
        )
    return pixels


def make_mask(
    kind: str,
    size: int,
    ratio: float = 0.5,
    patch: int = 1,
    box: tuple[float, float, float, float] | None = None,
    side: str = "left",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """A ``(size, size)`` bool mask, True = generate.

    Args:
        kind: ``random`` (``round(ratio · n)`` of the ``n`` patches of side ``patch``, drawn with ``generator``),
            ``box`` (``box`` = ``(x0, y0, x1, y1)`` as fractions of the side, or a centred square of area
            ``ratio``), ``half`` (the ``side`` half) or ``outpaint`` (a border of area ``ratio`` around a
            centred square).
        size: image side in pixels.
        ratio: share of the image to generate, in (0, 1) (``random``, centred ``box``, ``outpaint``).
        patch: patch side in pixels for ``random`` (the model's token footprint keeps the mask patch-aligned).
        box: corners of the box as fractions in [0, 1].
        side: ``left``, ``right``, ``top`` or ``bottom`` for ``half``.
        generator: seeds ``random``.
    """
    if kind not in MASK_KINDS:
        raise ValueError(f"unknown mask kind {kind!r}; expected one of {', '.join(MASK_KINDS)}")
    mask = torch.zeros(size, size, dtype=torch.bool)
    if kind == "random":
        check_ratio(ratio)
        if patch < 1 or size % patch:
            raise ValueError(f"image side {size} is not a multiple of the patch side {patch}")
        cells = size // patch
        count = min(max(round(ratio * cells**2), 1), cells**2 - 1) if cells > 1 else 1
        chosen = torch.zeros(cells**2, dtype=torch.bool)
        chosen[torch.randperm(cells**2, generator=generator)[:count]] = True
        return chosen.view(cells, cells).repeat_interleave(patch, 0).repeat_interleave(patch, 1)
    if kind == "box" and box is not None:
        if len(box) != 4 or not (0.0 <= box[0] < box[2] <= 1.0 and 0.0 <= box[1] < box[3] <= 1.0):
            raise ValueError(f"box {tuple(box)} is not (x0, y0, x1, y1) with 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1")
        left, top, right, bottom = (round(corner * size) for corner in box)
        if left == right or top == bottom:
            raise ValueError(f"box {tuple(box)} covers no pixel of a {size}x{size} image")
        mask[top:bottom, left:right] = True
        return mask
    if kind == "box":
        inner = max(round(size * math.sqrt(check_ratio(ratio))), 1)
        start = (size - inner) // 2
        mask[start : start + inner, start : start + inner] = True
        return mask
    if kind == "outpaint":
        inner = min(round(size * math.sqrt(1.0 - check_ratio(ratio))), size - 1)
        start = (size - inner) // 2
        mask[:] = True
        mask[start : start + inner, start : start + inner] = False
        return mask
    if side not in SIDES:
        raise ValueError(f"unknown side {side!r} for a half mask; expected one of {', '.join(SIDES)}")
    half = size // 2
    regions = {"left": (slice(None), slice(0, half)), "right": (slice(None), slice(size - half, size)),
               "top": (slice(0, half), slice(None)), "bottom": (slice(size - half, size), slice(None))}
    mask[regions[side]] = True
    return mask


def masker_mask(masker: Masker, grid: tuple[int, ...], ratio: float, token_pixels: int, tubelet: int = 1,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """The pixels of the tokens ``masker`` hides on a token ``grid``, bool, True = generate: ``(h·p, w·p)`` for an
    image grid ``(h, w)``, ``(t·tubelet, h·p, w·p)`` for a clip grid ``(t, h, w)``, with ``p = token_pixels``.

    The masker hides ``N - int(N (1 - ratio))`` of the N tokens (training's count), drawn with ``generator``.
    """
    check_ratio(ratio)
    hidden = masker.mask(1, tuple(grid), ratio, generator=generator).mask[0].cpu().view(*grid)
    if len(grid) == 3:
        hidden = hidden.repeat_interleave(tubelet, 0)
    return hidden.repeat_interleave(token_pixels, -2).repeat_interleave(token_pixels, -1)
