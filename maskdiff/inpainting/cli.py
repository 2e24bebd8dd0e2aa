"""``maskdiff inpaint``: fill a masked region of one image from a checkpoint and write a comparison panel.

    maskdiff inpaint --ckpt runs/quickstart/checkpoints/last.ckpt --image digits:0 --mask_kind half --side left --out panel.png
    maskdiff inpaint --ckpt last.ckpt --image photo.png --mask mask.png --samples 4 --sampler ddim --steps 50 --out panel.png
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from maskdiff.inpainting.masks import fit_square, load_mask, make_mask, token_mask

DIGITS_PREFIX = "digits:"
PANEL_MIN_SIDE = 64


def load_digit(spec: str) -> tuple[Image.Image, int]:
    """``digits:IDX`` -> the IDX-th digit of the embedded validation split as its 8×8 shard PNG pixels, and its label."""
    from maskdiff.data.digits import digits_pixels
    from maskdiff.evaluation.digits_judge import load_digits_split

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


def upscale(images: torch.Tensor, min_side: int = PANEL_MIN_SIDE) -> torch.Tensor:
    """``(B, C, S, S)`` -> nearest-upscaled by the smallest integer factor giving a side of at least ``min_side``."""
    factor = max(1, math.ceil(min_side / images.shape[-1]))
    return F.interpolate(images, scale_factor=factor, mode="nearest") if factor > 1 else images


def inpaint(
    ckpt: str,
    image: str,
    out: str = "inpaint.png",
    mask: str | None = None,
    mask_kind: Literal["random", "box", "half", "outpaint"] = "random",
    mask_ratio: float = 0.5,
    box: list[float] | None = None,
    side: Literal["left", "right", "top", "bottom"] = "left",
    label: int | None = None,
    samples: int = 4,
    sampler: Literal["ddpm", "ddim"] = "ddpm",
    steps: int = 250,
    eta: float = 0.0,
    cfg_scale: float | None = None,
    seed: int = 0,
    weights: Literal["ema", "raw"] = "ema",
    device: str = "cpu",
) -> str:
    """Inpaint one image and write a PNG panel: input | input with the masked region greyed | results.

    The image is centre-cropped and resized to the model's input (patch grid side × patch size × autoencoder
    downsample); a token is generated if any of its pixels is masked, and the known pixels are pasted back exactly.

    Args:
        ckpt: maskdiff checkpoint (generative models sample RePaint-style; MAE fills the mask in one step).
        image: an image file, or ``digits:IDX`` for the IDX-th digit of the embedded validation split.
        out: PNG path of the panel.
        mask: mask PNG, white (nonzero) = generate, of the image's size or aspect ratio; overrides ``mask_kind``.
        mask_kind: ``random`` patches (aligned to the model's tokens), a ``box``, a ``half`` or an ``outpaint`` border.
        mask_ratio: share of the image to generate for ``random``, a centred ``box`` and ``outpaint``, in (0, 1).
        box: ``[x0, y0, x1, y1]`` as fractions of the side for ``box`` (e.g. ``--box [0.25,0.25,0.75,0.75]``).
        side: the half to generate for ``half``.
        label: class to condition on (default: the digit's own label for ``digits:IDX``, else unconditional).
        samples: results to draw (one for deterministic methods such as MAE).
        sampler: ``ddpm`` (ancestral, respaced) or ``ddim``.
        steps: respaced sampling steps.
        eta: DDIM η (0 = deterministic).
        cfg_scale: classifier-free guidance scale (1 = off); default: the guidance stored with the method, or none.
        seed: seeds the random mask and the sampling noise.
        weights: ``ema`` or ``raw`` backbone weights.
        device: torch device to run on.
    """
    from maskdiff.callbacks.sample_grid import save_grid
    from maskdiff.checkpoints import load_method
    from maskdiff.samplers import ClassifierFreeGuidance, DDIMSampler, DDPMSampler

    if samples < 1:
        raise ValueError(f"samples must be at least 1, got {samples}")
    module = load_method(ckpt, map_location=device).to(device).eval()
    if weights == "ema" and module.ema_backbone is None:
        print(f"note: {ckpt} has no EMA weights; inpainting with the raw weights", file=sys.stderr)
    token_pixels = module.autoencoder.downsample * module.patchifier.patch_size
    size = module.patchifier.input_size * module.autoencoder.downsample
    channels = module.patchifier.channels if module.autoencoder.latent_channels is None else 3
    picture, own_label, source_size = load_image(image, size, channels)
    if mask is not None:
        pixel_mask = load_mask(mask, size, source_size)
        described_mask = f"mask {mask}"
    else:
        pixel_mask = make_mask(mask_kind, size, mask_ratio, token_pixels, None if box is None else tuple(box), side,
                               torch.Generator().manual_seed(seed))
        detail = {"random": f"ratio {mask_ratio}", "box": f"box {box}" if box else f"centred, ratio {mask_ratio}",
                  "half": side, "outpaint": f"ratio {mask_ratio}"}[mask_kind]
        described_mask = f"{mask_kind} mask ({detail})"
    tokens = token_mask(pixel_mask[None], token_pixels)

    label = own_label if label is None else label
    if module.conditional and label is not None and not 0 <= label < module.backbone.num_classes:
        raise ValueError(f"label {label} is outside [0, {module.backbone.num_classes}) for this model")
    conditioned = module.conditional and label is not None
    generative = getattr(module.corruption, "schedule", None) is not None
    if not generative and samples > 1:
        print(f"note: {type(module).__name__} inpaints deterministically in one step; drawing 1 result, not {samples}",
              file=sys.stderr)
        samples = 1
    chosen = DDIMSampler(steps, eta) if sampler == "ddim" else DDPMSampler(steps)
    guidance = None if cfg_scale is None else ClassifierFreeGuidance(cfg_scale)
    results = module.inpaint(
        picture.expand(samples, -1, -1, -1), pixel_mask, torch.full((samples,), label) if conditioned else None,
        sampler=chosen, guidance=guidance, generator=torch.Generator().manual_seed(seed), use_ema=weights == "ema",
    ).cpu()

    greyed = torch.where(pixel_mask, torch.zeros_like(picture), picture)
    panel = torch.cat([picture[None], greyed[None], results])
    path = save_grid(upscale(panel), out, per_row=len(panel))
    if generative:
        used = guidance or module.guidance
        cfg = f"cfg {used.scale}" if used is not None and used.active and conditioned else "no guidance"
        how = f"{sampler}-{steps}, {cfg}, seed {seed}"
    else:
        how = "one-step reconstruction (no sampler)"
    print(
        f"wrote {path}: {type(module).__name__} inpainting of {image} at {size}x{size}, "
        f"{'label ' + str(label) if conditioned else 'unconditional'}, {described_mask}: "
        f"{pixel_mask.float().mean().item():.1%} of pixels masked, {int(tokens.sum())}/{tokens.numel()} tokens generated; "
        f"{samples} result(s), {how}, {weights} weights"
    )
    return str(path)
