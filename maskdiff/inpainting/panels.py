"""Panels of inpainting results: rows of tiles with an optional text label left of each row, drawn by
:mod:`maskdiff.images` (the same drawing as every sample grid)."""

from __future__ import annotations

from maskdiff.images import (
    LABEL_GAP,
    PANEL_MIN_SIDE,
    TITLE_HEIGHT,
    grid_pixels,
    label_width,
    labelled_panel,
    save_panel,
    upscale,
)

__all__ = ["LABEL_GAP", "PANEL_MIN_SIDE", "TITLE_HEIGHT", "grid_pixels", "label_width", "labelled_panel", "save_panel",
           "upscale"]
