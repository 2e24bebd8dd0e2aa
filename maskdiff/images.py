"""Grids of images for people to look at: small images nearest-upscaled to a viewable size, tiles in rows with a 1-px
white padding, an optional text label left of each row and titles above the columns; written atomically.

Sample grids (:class:`~maskdiff.callbacks.SampleGrid`, ``maskdiff sample``), inpainting panels (``maskdiff inpaint``)
and reconstructions are all drawn here, so that they look alike.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torchvision.utils import make_grid

from maskdiff.files import save_image

LABEL_GAP = 4
TITLE_HEIGHT = 14
PANEL_MIN_SIDE = 64


def upscale(images: torch.Tensor, min_side: int = PANEL_MIN_SIDE) -> torch.Tensor:
    """``(B, C, H, W)`` -> nearest-upscaled by the smallest integer factor giving a shorter side of at least
    ``min_side`` (unchanged when it already has one): every pixel becomes a ``factor × factor`` block."""
    factor = max(1, math.ceil(min_side / min(images.shape[-2:])))
    return F.interpolate(images, scale_factor=factor, mode="nearest") if factor > 1 else images


def grid_pixels(rows: list[torch.Tensor], per_row: int) -> np.ndarray:
    """Rows of tiles ``(K_r, C, H, W)`` in [-1, 1] (``K_r <= per_row``; short rows end in white blanks) ->
    ``(H', W', 3)`` uint8 with a 1-px white padding (torchvision's ``make_grid``, rounded as its ``save_image``)."""
    blank = torch.ones_like(rows[0][:1])
    tiles = []
    for row in rows:
        if len(row) > per_row:
            raise ValueError(f"a row of {len(row)} tiles does not fit {per_row} per row")
        tiles.extend([row, blank.expand(per_row - len(row), -1, -1, -1)])
    grid = make_grid(torch.cat(tiles).float().clamp(-1, 1) * 0.5 + 0.5, nrow=per_row, padding=1, pad_value=1.0)
    return grid.mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()


def label_width(labels: list[str | None]) -> int:
    """Width in pixels of the label margin for ``labels`` (0 when none has text)."""
    font = ImageFont.load_default()
    widths = [ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox((0, 0), text, font=font)[2] for text in labels if text]
    return max(widths) + 2 * LABEL_GAP if widths else 0


def labelled_panel(rows: list[tuple[str | None, torch.Tensor]], per_row: int, margin: int | None = None,
                   titles: list[str] | None = None, min_side: int = PANEL_MIN_SIDE) -> Image.Image:
    """``[(label, tiles (K, C, H, W) in [-1, 1])]`` -> an RGB panel: one grid row per entry, the tiles
    :func:`upscale`-d to ``min_side``, its label written in a white margin on the left (``margin`` pixels wide;
    default: the widest label's :func:`label_width`), and ``titles`` (one per column) in a band of
    ``TITLE_HEIGHT`` pixels on top."""
    tiles = [upscale(row, min_side) for _, row in rows]
    pixels = grid_pixels(tiles, per_row)
    margin = label_width([label for label, _ in rows]) if margin is None else margin
    top = TITLE_HEIGHT if titles else 0
    panel = Image.new("RGB", (margin + pixels.shape[1], top + pixels.shape[0]), "white")
    panel.paste(Image.fromarray(pixels), (margin, top))
    draw = ImageDraw.Draw(panel)
    font = ImageFont.load_default()
    tile_height, tile_width = tiles[0].shape[-2:]
    for index, (label, _) in enumerate(rows):
        if label and margin:
            centre = top + 1 + index * (tile_height + 1) + tile_height // 2
            draw.text((LABEL_GAP, centre), label, fill="black", font=font, anchor="lm")
    for index, title in enumerate(titles or []):
        draw.text((margin + 1 + index * (tile_width + 1) + tile_width // 2, top // 2), title, fill="black", font=font,
                  anchor="mm")
    return panel


def grid_image(images: torch.Tensor, per_row: int, row_labels: list[str] | None = None,
               min_side: int = PANEL_MIN_SIDE) -> Image.Image:
    """``images (B, C, H, W)`` in [-1, 1] -> an RGB grid of ``per_row`` images per row (the last row may be short),
    each :func:`upscale`-d to ``min_side``; ``row_labels`` (one per row, ``ceil(B / per_row)``) are written left of
    the rows."""
    if per_row < 1:
        raise ValueError(f"per_row must be at least 1, got {per_row}")
    rows = list(images.split(per_row))
    if row_labels is not None and len(row_labels) != len(rows):
        raise ValueError(f"{len(row_labels)} row labels for {len(rows)} rows of {per_row} images ({len(images)} images)")
    labels = row_labels if row_labels is not None else [None] * len(rows)
    return labelled_panel(list(zip(labels, rows)), per_row, min_side=min_side)


def save_grid(images: torch.Tensor, path: str | Path, per_row: int, row_labels: list[str] | None = None,
              min_side: int = PANEL_MIN_SIDE) -> Path:
    """Save ``images (B, C, H, W)`` in [-1, 1] as a :func:`grid_image` (atomically; the format follows ``path``'s
    suffix)."""
    return save_image(grid_image(images, per_row, row_labels, min_side), path)


def save_panel(rows: list[tuple[str | None, torch.Tensor]], path: str | Path, per_row: int,
               titles: list[str] | None = None) -> Path:
    """Write :func:`labelled_panel` (atomically; the format follows ``path``'s suffix)."""
    return save_image(labelled_panel(rows, per_row, titles=titles), path)
