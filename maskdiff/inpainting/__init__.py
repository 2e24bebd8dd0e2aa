"""Inpainting: masks (loaded or generated) for :meth:`maskdiff.methods.MaskDiffModule.inpaint` and ``maskdiff inpaint``,
video masks and clip I/O (:mod:`maskdiff.inpainting.video`), and the one-call x̂0 sampler (MAE as a first step)."""

from maskdiff.inpainting.first_step import FirstStepSampler
from maskdiff.inpainting.masks import (
    MASK_KINDS,
    as_pixel_mask,
    fit_square,
    load_mask,
    make_mask,
    token_mask,
)
from maskdiff.inpainting.video import (
    VIDEO_MASK_KINDS,
    make_video_mask,
)

__all__ = ["MASK_KINDS", "VIDEO_MASK_KINDS", "FirstStepSampler", "as_pixel_mask", "fit_square", "load_mask", "make_mask",
           "make_video_mask", "token_mask"]
