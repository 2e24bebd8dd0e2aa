"""Images to inpaint: an image file or a digit of the embedded validation split, fitted to a model's input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from maskdiff.data.digits import digits_pixels
from maskdiff.evaluation.digits_judge import load_digits_split
from maskdiff.inpainting.masks import fit_square

DIGITS_PREFIX = "digits:"


def load_digit(spec: str) -> tuple[Image.Image, int]:
    """``digits:IDX`` -> the IDX-th digit of the embedded validation split as its 8×8 shard PNG pixels, and its label."""
    images, labels = load_digits_split("val")
    index = spec[len(DIGITS_PREFIX):]
    if not index.isdigit() or int(index) >= len(labels):
        raise ValueError(f"image {spec!r}: expected digits:IDX with IDX in [0, {len(labels)}) (the digits validation split)")
    values = ((images[int(index), 0] + 1) * 8).numpy()
    return Image.fromarray(digits_pixels(values), mode="L"), int(labels[int(index)])


def load_image(spec: str, size: int, channels: int) -> tuple[torch.Tensor, int | None, tuple[int, int]]:
    """An image file or ``digits:IDX`` -> ``(image (C, size, size) in [-1, 1], label or None, source (width, height))``.

    Centre-cropped to a square and resized bilinearly, as the data pipeline does.
    """
    label = None
    if spec.startswith(DIGITS_PREFIX):
        image, label = load_digit(spec)
    else:
        try:
            with Image.open(Path(spec).expanduser()) as opened:
                image = opened.convert("L" if channels == 1 else "RGB")
        except (FileNotFoundError, UnidentifiedImageError, OSError) as error:
            raise ValueError(f"cannot read image {spec}: {error}; expected an image file or digits:IDX") from error
    source_size = image.size
    if image.mode != ("L" if channels == 1 else "RGB"):
        image = image.convert("L" if channels == 1 else "RGB")
    pixels = torch.from_numpy(np.array(fit_square(image, size, Image.Resampling.BILINEAR), dtype=np.uint8))
    pixels = pixels.unsqueeze(0) if channels == 1 else pixels.permute(2, 0, 1)
    return pixels.float() / 127.5 - 1.0, label, source_size
