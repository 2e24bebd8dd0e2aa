"""Inpainting: masks (loaded or generated) for :meth:`maskdiff.methods.MaskDiffModule.inpaint` and ``maskdiff inpaint``."""

from maskdiff.inpainting.masks import MASK_KINDS, as_pixel_mask, fit_square, load_mask, make_mask, token_mask

__all__ = ["MASK_KINDS", "as_pixel_mask", "fit_square", "load_mask", "make_mask", "token_mask"]
