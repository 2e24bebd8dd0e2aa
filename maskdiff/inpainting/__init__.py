"""Inpainting: masks (loaded or generated) for :meth:`maskdiff.methods.MaskDiffModule.inpaint` and ``maskdiff inpaint``,
video masks and clip I/O (:mod:`maskdiff.inpainting.video`)."""

from maskdiff.corruption.pixel_masks import as_pixel_mask, token_mask
from maskdiff.inpainting.masks import MASK_KINDS, fit_square, load_mask, make_mask
from maskdiff.inpainting.video import (
    VIDEO_MASK_KINDS,
    make_video_mask,
)

__all__ = ["MASK_KINDS", "VIDEO_MASK_KINDS", "as_pixel_mask", "fit_square", "load_mask", "make_mask",
           "make_video_mask", "token_mask"]
