"""Image decoding and the crops of DiT/MDT (ADM centre crop), MAE (RandomResizedCrop) and UMD (big_vision's inception
crop) on uint8 tensors.

Images are decoded to uint8 ``(C, H, W)`` tensors by ``torchvision.io`` (PIL when torchvision cannot decode
them), cropped, resized and flipped with ``torchvision.transforms.v2.functional`` while still uint8, and
converted to float only once, at the output size. A large JPEG whose output needs at most 1/2, 1/4 or 1/8
of its resolution is decoded at that reduced size by libjpeg (PIL's ``draft``), which is several times
cheaper than decoding it whole and resizing it down.

Every crop is split into a *plan*, drawn from the image size alone (``(height, width)`` from the header)
and, for random crops, from a ``random.Random``, and its application to the decoded pixels; so the random
draws do not depend on how the image was decoded.
"""

from __future__ import annotations

import io
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from PIL import Image, UnidentifiedImageError
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms import InterpolationMode

CROPS = ("center", "adm_center", "random_resized", "inception")
DRAFT_FACTORS = (8, 4, 2)


@dataclass(frozen=True)
class Box:
    """A pixel rectangle ``[top, top + height) x [left, left + width)``."""

    top: int
    left: int
    height: int
    width: int

    def scaled(self, scale_y: float, scale_x: float) -> Box:
        """The same region in an image resized by ``(scale_y, scale_x)`` (at least one pixel)."""
        top, left = round(self.top * scale_y), round(self.left * scale_x)
        bottom, right = round((self.top + self.height) * scale_y), round((self.left + self.width) * scale_x)
        return Box(top, left, max(1, bottom - top), max(1, right - left))


# ---------------------------------------------------------------------------------------------- decoding


def open_header(data: bytes) -> Image.Image:
    """PIL's lazy open: format, mode and size from the header; raises ``UnidentifiedImageError`` for non-images."""
    return Image.open(io.BytesIO(data))


def pil_mode(channels: int) -> str:
    return "L" if channels == 1 else "RGB"


def decode_pixels(data: bytes, channels: int, header: Image.Image | None = None, reduce: int = 1) -> torch.Tensor:
    """Decode image bytes to uint8 ``(channels, H, W)``.

    ``reduce > 1`` decodes a JPEG at ``1/reduce`` of its size (libjpeg DCT scaling through PIL's
    ``draft``; ``header`` must be the lazily opened image). Otherwise ``torchvision.io.decode_image``
    decodes JPEG, PNG, WebP and GIF, and PIL what it cannot (other formats, unusual JPEGs, WebP to
    grayscale). 16-bit PNGs are scaled to 8 bits; alpha is dropped; colour to grayscale conversion is
    within a grey level of PIL's ``convert("L")``.
    """
    mode = pil_mode(channels)
    if reduce > 1 and header is not None and header.format == "JPEG":
        header.draft(mode, (header.width // reduce, header.height // reduce))
        return TF.pil_to_tensor(header.convert(mode))
    pixels = None
    if not (channels == 1 and header is not None and header.format == "WEBP"):
        pixels = _decode_with_torchvision(data, channels)
    if pixels is None:
        image = header if header is not None else open_header(data)
        return TF.pil_to_tensor(image.convert(mode))
    return pixels


def _decode_with_torchvision(data: bytes, channels: int) -> torch.Tensor | None:
    """uint8 ``(channels, H, W)``, or ``None`` when torchvision cannot decode ``data`` to ``channels``."""
    try:
        pixels = decode_image(
            torch.frombuffer(bytearray(data), dtype=torch.uint8),
            mode=ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB,
        )
    except RuntimeError:
        return None
    if pixels.shape[0] != channels:
        return None
    return pixels if pixels.dtype == torch.uint8 else TF.to_dtype(pixels, torch.uint8, scale=True)


class EncodedImage:
    """Image bytes whose size comes from the header, decoded on demand (at a reduced size when allowed).

    Attributes:
        height, width: the full size.
    """

    def __init__(self, data: bytes, channels: int, reduced_decoding: bool = True):
        self.data = data
        self.channels = channels
        self.reduced_decoding = reduced_decoding
        self._decoded: torch.Tensor | None = None
        try:
            self.header: Image.Image | None = open_header(data)
            self.height, self.width = self.header.height, self.header.width
        except UnidentifiedImageError:
            self.header = None
            self._decoded = decode_pixels(data, channels)
            self.height, self.width = self._decoded.shape[-2:]

    def decode(self, reduce: int = 1) -> torch.Tensor:
        """uint8 ``(C, H', W')``: the full size, or about ``1/reduce`` of it for JPEGs (see :func:`decode_pixels`)."""
        if self._decoded is not None:
            return self._decoded
        return decode_pixels(self.data, self.channels, self.header, reduce if self.reduced_decoding else 1)


def draft_factor(available: int, needed: int) -> int:
    """The largest of 8, 4, 2 by which ``available`` pixels can shrink and still cover ``needed`` (else 1)."""
    return next((factor for factor in DRAFT_FACTORS if available >= factor * needed), 1)


def to_signed_float(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 ``(..., H, W)`` in [0, 255] -> float32 in [-1, 1]."""
    return pixels.float().div_(127.5).sub_(1.0)


# ---------------------------------------------------------------------------------------------- crops


def random_resized_crop_box(
    height: int, width: int, scale: Sequence[float], ratio: Sequence[float], rng: random.Random
) -> Box:
    """torchvision's ``RandomResizedCrop.get_params`` with draws from ``rng`` instead of torch's global generator.

    Ten tries at a box of ``scale`` times the area and aspect ratio (w/h) log-uniform in ``ratio``;
    then the centre crop closest to ``ratio``.
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        box_width = round(math.sqrt(target_area * aspect))
        box_height = round(math.sqrt(target_area / aspect))
        if 0 < box_width <= width and 0 < box_height <= height:
            return Box(rng.randint(0, height - box_height), rng.randint(0, width - box_width), box_height, box_width)
    in_ratio = width / height
    if in_ratio < min(ratio):
        box_width, box_height = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        box_height, box_width = height, round(height * max(ratio))
    else:
        box_width, box_height = width, height
    return Box((height - box_height) // 2, (width - box_width) // 2, box_height, box_width)


def inception_crop_box(
    height: int, width: int, area: Sequence[float], ratio: Sequence[float], rng: random.Random, attempts: int = 100
) -> Box:
    """big_vision's ``inception_crop``: TensorFlow's ``sample_distorted_bounding_box`` with no boxes and
    ``min_object_covered=0``, with draws from ``rng``.

    Up to ``attempts`` tries: an aspect ratio (w/h) uniform in ``ratio``, a height uniform over the integers whose
    box (width ``round(h · aspect)``) covers ``area`` times the image, the top-left corner uniform over
    ``[0, H - h) x [0, W - w)`` (0 when the box spans the side); the whole image when every try fails.
    """
    min_area, max_area = area[0] * height * width, area[1] * height * width
    for _ in range(attempts):
        aspect = ratio[0] + rng.random() * (ratio[1] - ratio[0])
        box = _tf_random_crop(height, width, min_area, max_area, aspect, rng)
        if box is not None:
            return box
    return Box(0, 0, height, width)


def _tf_random_crop(
    height: int, width: int, min_area: float, max_area: float, aspect: float, rng: random.Random
) -> Box | None:
    """One try of TensorFlow's ``GenerateRandomCrop`` (rounding half to even, as ``lrintf``); ``None`` when it fails."""
    box_height = round(math.sqrt(min_area / aspect))
    max_height = round(math.sqrt(max_area / aspect))
    if round(max_height * aspect) > width:
        max_height = int((width + 0.5 - 1e-7) / aspect)
        if round(max_height * aspect) > width:
            max_height -= 1
    max_height = min(max_height, height)
    box_height = min(box_height, max_height)
    if box_height < max_height:
        box_height += rng.randint(0, max_height - box_height)
    box_width = round(box_height * aspect)
    if box_width * box_height < min_area:
        box_height += 1
        box_width = round(box_height * aspect)
    if box_width * box_height > max_area:
        box_height -= 1
        box_width = round(box_height * aspect)
    box_area = box_width * box_height
    if not (min_area <= box_area <= max_area and 0 < box_width <= width and 0 < box_height <= height):
        return None
    top = rng.randrange(height - box_height) if box_height < height else 0
    left = rng.randrange(width - box_width) if box_width < width else 0
    return Box(top, left, box_height, box_width)


def tf_bilinear_resize(pixels: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """uint8 ``(C, H, W)`` -> ``(C, height, width)`` as ``tf.image.resize(bilinear, antialias=False)`` and big_vision's
    cast back to uint8: half-pixel centres, no antialiasing, clipped and truncated."""
    resized = F.interpolate(pixels[None].float(), size=(height, width), mode="bilinear", align_corners=False)[0]
    return resized.clamp_(0, 255).to(torch.uint8)


def inception_crop(pixels: torch.Tensor, box: Box, size: int) -> torch.Tensor:
    """uint8 ``(C, H, W)`` -> ``(C, size, size)``: ``box`` resized bilinearly without antialiasing (big_vision's
    ``decode_jpeg_and_inception_crop`` defaults)."""
    crop = pixels[..., box.top : box.top + box.height, box.left : box.left + box.width]
    return tf_bilinear_resize(crop, size, size)


def resize_small_central_crop(pixels: torch.Tensor, resize: int, size: int) -> torch.Tensor:
    """big_vision's evaluation ``resize_small(resize)|central_crop(size)`` on uint8 ``(C, H, W)``: the shorter side
    resized bilinearly (no antialiasing) to ``resize``, then the centre ``size`` square (offsets rounded down)."""
    height, width = pixels.shape[-2:]
    factor = resize / min(height, width)
    resized = tf_bilinear_resize(pixels, round(height * factor), round(width * factor))
    top, left = (resized.shape[-2] - size) // 2, (resized.shape[-1] - size) // 2
    return resized[..., top : top + size, left : left + size]


def _box_downscale(values: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """PIL's BOX resampling of float ``values`` along ``dim`` to ``size``, rounded half up.

    Output ``i`` averages inputs ``floor(i * s + 1/2) <= j < floor((i + 1) * s + 1/2)``, ``s = n / size``.
    """
    dim = dim % values.dim()
    length = values.shape[dim]
    edges = (2 * torch.arange(size + 1) * length + size) // (2 * size)
    sums = torch.cat([torch.zeros_like(values.narrow(dim, 0, 1)), values.cumsum(dim)], dim)
    counts_shape = [size if d == dim else 1 for d in range(values.dim())]
    counts = (edges[1:] - edges[:-1]).to(values.dtype).view(counts_shape)
    totals = sums.index_select(dim, edges[1:]) - sums.index_select(dim, edges[:-1])
    return totals.div_(counts).add_(0.5).floor_()


def box_halve(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 ``(C, H, W)`` -> ``(C, H // 2, W // 2)`` as PIL's ``resize(..., Image.BOX)`` (width first, then height)."""
    height, width = pixels.shape[-2:]
    halved = _box_downscale(_box_downscale(pixels.float(), -1, width // 2), -2, height // 2)
    return halved.to(torch.uint8)


def adm_halvings(height: int, width: int, size: int) -> int:
    """How often ADM's ``center_crop_arr`` BOX-halves an image before its bicubic resize."""
    halvings = 0
    while min(height, width) >= 2 * size:
        height, width, halvings = height // 2, width // 2, halvings + 1
    return halvings


def adm_center_crop(pixels: torch.Tensor, size: int, halvings: int | None = None) -> torch.Tensor:
    """guided-diffusion's ``center_crop_arr`` on uint8 ``(C, H, W)`` -> ``(C, size, size)``.

    BOX-halve while the shorter side is at least ``2 * size`` (or exactly ``halvings`` times, for pixels
    already decoded at a reduced size), resize bicubically so the shorter side is ``size``, then take the
    centre (offsets rounded down).
    """
    if halvings is None:
        halvings = adm_halvings(*pixels.shape[-2:], size)
    for _ in range(halvings):
        pixels = box_halve(pixels)
    height, width = pixels.shape[-2:]
    scale = size / min(height, width)
    resized = TF.resize(
        pixels, [round(height * scale), round(width * scale)], interpolation=InterpolationMode.BICUBIC, antialias=True
    )
    top, left = (resized.shape[-2] - size) // 2, (resized.shape[-1] - size) // 2
    return resized[..., top : top + size, left : left + size]


def resize_center_crop(pixels: torch.Tensor, resize: int, size: int) -> torch.Tensor:
    """MAE's evaluation transform on uint8 ``(C, H, W)``: bicubic resize of the shorter side to ``resize``,
    then a ``size`` centre crop -> ``(C, size, size)``."""
    resized = TF.resize(pixels, [resize], interpolation=InterpolationMode.BICUBIC, antialias=True)
    return TF.center_crop(resized, [size, size])


def crop_resize(pixels: torch.Tensor, box: Box, size: int, interpolation: InterpolationMode) -> torch.Tensor:
    """Crop ``box`` from uint8 ``(C, H, W)`` and resize it (antialiased) to ``(C, size, size)``."""
    if (box.height, box.width) == (size, size):
        return pixels[..., box.top : box.top + size, box.left : box.left + size]
    return TF.resized_crop(
        pixels, box.top, box.left, box.height, box.width, [size, size], interpolation=interpolation, antialias=True
    )


def square_center_box(height: int, width: int) -> Box:
    """The largest centred square (offsets rounded down)."""
    side = min(height, width)
    return Box((height - side) // 2, (width - side) // 2, side, side)
