"""Panels of inpainting results: rows of tiles with an optional text label left of each row."""

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
    """``(B, C, S, S)`` -> nearest-upscaled by the smallest integer factor giving a side of at least ``min_side``."""
    factor = max(1, math.ceil(min_side / images.shape[-1]))
    return F.interpolate(images, scale_factor=factor, mode="nearest") if factor > 1 else images


def grid_pixels(rows: list[torch.Tensor], per_row: int) -> np.ndarray:
    """Rows of tiles ``(K_r, C, H, W)`` in [-1, 1] (``K_r <= per_row``; short rows end in white blanks) ->
    ``(H', W', 3)`` uint8 with a 1-px white padding, as :func:`~maskdiff.callbacks.sample_grid.save_grid` draws."""
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
                   titles: list[str] | None = None) -> Image.Image:
    """``[(label, tiles (K, C, H, W) in [-1, 1])]`` -> an RGB panel: one grid row per entry, its label written in a
    white margin on the left (``margin`` pixels wide; default: the widest label's :func:`label_width`), and
    ``titles`` (one per column) in a band of ``TITLE_HEIGHT`` pixels on top."""
    pixels = grid_pixels([tiles for _, tiles in rows], per_row)
    margin = label_width([label for label, _ in rows]) if margin is None else margin
    top = TITLE_HEIGHT if titles else 0
    panel = Image.new("RGB", (margin + pixels.shape[1], top + pixels.shape[0]), "white")
    panel.paste(Image.fromarray(pixels), (margin, top))
    draw = ImageDraw.Draw(panel)
    font = ImageFont.load_default()
    tile_height, tile_width = rows[0][1].shape[-2:]
    for index, (label, _) in enumerate(rows):
        if label and margin:
            centre = top + 1 + index * (tile_height + 1) + tile_height // 2
            draw.text((LABEL_GAP, centre), label, fill="black", font=font, anchor="lm")
    for index, title in enumerate(titles or []):
        draw.text((margin + 1 + index * (tile_width + 1) + tile_width // 2, top // 2), title, fill="black", font=font,
                  anchor="mm")
    return panel


def save_panel(rows: list[tuple[str | None, torch.Tensor]], path: str | Path, per_row: int,
               titles: list[str] | None = None) -> Path:
    """Write :func:`labelled_panel` as a PNG (atomically)."""
    return save_image(labelled_panel(rows, per_row, titles=titles), path)
