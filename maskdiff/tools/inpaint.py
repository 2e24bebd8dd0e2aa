"""``maskdiff inpaint``: fill a masked region of one image or video clip from a checkpoint and write a panel.

    maskdiff inpaint --ckpt runs/quickstart/checkpoints/last.ckpt --image digits:0 --mask_kind half --side left --out panel.png
    maskdiff inpaint --ckpt last.ckpt --image photo.png --mask mask.png --samples 4 --sampler ddim --steps 50 --out panel.png
    maskdiff inpaint --ckpt runs/diffmae_digits/checkpoints/last.ckpt --compare_ckpt runs/mae_digits/checkpoints/last.ckpt \\
        --image digits:3 --mask_kind random --mask_ratio 0.75 --steps 100 --out mae_vs_diffmae.png
    maskdiff inpaint --ckpt last.ckpt --image digits:3 --mask_kind random --masker maskdiff.corruption.BlockMasker --out blocks.png
    maskdiff inpaint --ckpt runs/diffmae_moving_digits/checkpoints/last.ckpt --video moving_digits:0 --mask_kind tube \\
        --mask_ratio 0.9 --samples 2 --steps 100 --out clip.gif          # also writes clip_strip.png

Images, masks, clips and panels are made by :mod:`maskdiff.inpainting`; each model samples as
:func:`~maskdiff.tools.sampling.build_sampling` says.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from maskdiff.callbacks.sample_grid import save_grid
from maskdiff.corruption.maskers import Masker
from maskdiff.corruption.pixel_masks import token_mask
from maskdiff.files import ensure_writable_directory
from maskdiff.inpainting.images import load_image
from maskdiff.inpainting.masks import MASK_KINDS, check_ratio, load_mask, make_mask, masker_mask
from maskdiff.inpainting.panels import label_width, labelled_panel, save_panel, upscale
from maskdiff.inpainting.video import (
    ANIMATION_SUFFIXES,
    MOVING_DIGITS_PREFIX,
    VIDEO_MASK_KINDS,
    fit_clip,
    inpaint_clip,
    load_moving_digits_clip,
    make_video_mask,
    read_video_frames,
    write_animation,
)
from maskdiff.methods.base import MaskDiffModule
from maskdiff.methods.checkpoints import load_method
from maskdiff.progress import sampling_progress
from maskdiff.tools.sampling import ONE_STEP, Sampling, build_sampling, describe_guidance, describe_sampler

Models = list[tuple[MaskDiffModule, str]]


def model_label(module: MaskDiffModule, ckpt: str, others: Models) -> str:
    """Row label of a model in a comparison: its method class, plus the checkpoint path when two share a class."""
    name = type(module).__name__
    return f"{name} ({ckpt})" if sum(type(other).__name__ == name for other, _ in others) > 1 else name


def check_same_geometry(module: MaskDiffModule, other: MaskDiffModule, ckpt: str, compare_ckpt: str) -> None:
    """Both models must take the same input and cut it into the same token grid, so one mask means the same to both."""
    def geometry(method: MaskDiffModule) -> tuple:
        patchifier = method.patchifier
        return (tuple(patchifier.sample_shape[1:]), patchifier.grid, method.autoencoder.downsample * patchifier.patch_size,
                patchifier.tubelet)

    if geometry(module) != geometry(other):
        (shape, grid, pixels, tubelet), (other_shape, other_grid, other_pixels, other_tubelet) = geometry(module), geometry(other)
        raise ValueError(
            f"--compare_ckpt needs the same input and token grid as --ckpt so both see the same mask: {ckpt} takes "
            f"{shape} inputs as a {grid} grid of {tubelet}x{pixels}x{pixels}-px tokens, {compare_ckpt} takes "
            f"{other_shape} as a {other_grid} grid of {other_tubelet}x{other_pixels}x{other_pixels}-px tokens"
        )


def sampling_note(sampling: Sampling, seed: int, conditioned: bool) -> str:
    """What a model sampled with, for the command's output; guidance only counts for a class-conditioned model."""
    if sampling.description == ONE_STEP:
        return ONE_STEP
    guidance = describe_guidance(sampling.guidance) if conditioned else "no guidance"
    return f"{describe_sampler(sampling.sampler)}, {guidance}, seed {seed}"


def draws_for(module: MaskDiffModule, samples: int) -> int:
    """``samples``, or 1 for a deterministic (non-generative) method, with a note."""
    if module.corruption.schedule is None and samples > 1:
        print(f"note: {type(module).__name__} inpaints deterministically in one step; drawing 1 result, not {samples}",
              file=sys.stderr)
        return 1
    return samples


def chain_progress(module: MaskDiffModule, hidden: torch.Tensor, sampling: Sampling, name: str,
                   enabled: bool | None):
    """``(bar, callback)`` over the sampling steps ``module`` runs to inpaint the token mask ``hidden (B, N)``; no bar
    for a one-pass reconstruction."""
    steps = module.inpainting_steps(hidden, sampling.sampler)
    return sampling_progress(steps, f"inpainting with {name}", enabled if steps else False)


def random_mask_note(mask_ratio: float, masker: Masker | None) -> str:
    return f"ratio {mask_ratio}" if masker is None else f"ratio {mask_ratio}, {masker!r}"


def inpaint(
    ckpt: str,
    image: str | None = None,
    video: str | None = None,
    out: str | None = None,
    compare_ckpt: str | None = None,
    mask: str | None = None,
    mask_kind: Literal["random", "box", "half", "outpaint", "tube", "future"] | None = None,
    mask_ratio: float | None = None,
    masker: Masker | None = None,
    box: list[float] | None = None,
    side: Literal["left", "right", "top", "bottom"] = "left",
    future_frames: int | None = None,
    start_frame: int = 0,
    fps: int = 4,
    label: int | None = None,
    samples: int = 4,
    sampler: Literal["ddpm", "ddim", "first_step"] | None = None,
    steps: int | None = None,
    eta: float | None = None,
    cfg_scale: float | None = None,
    seed: int = 0,
    weights: Literal["ema", "raw"] = "ema",
    device: str = "cpu",
    progress: bool | None = None,
) -> str:
    """Inpaint one image (a PNG panel) or one video clip (an animated GIF/MP4 and a frame strip PNG).

        maskdiff inpaint --ckpt runs/quickstart/checkpoints/last.ckpt --image digits:0 --mask_kind half --out panel.png

    Image: the panel is input | input with the masked region greyed | results. The image is centre-cropped and
    resized to the model's input (patch grid side × patch size × autoencoder downsample); a token is generated if
    any of its pixels is masked, and the known pixels are pasted back exactly.

    Video (a model whose patchifier has frames, e.g. DiffMAE on moving digits): the clip's frames ``start_frame``
    onwards are cut to the model's length and resized like images; the animation shows original | masked |
    completed side by side, and ``<out stem>_strip.png`` has one row each for the original, the masked clip and
    every completed sample, one column per frame. DiffMAE runs its encoder once on the known tubelets and the
    reverse chain on the hidden ones; known pixels are kept exactly.

    With ``compare_ckpt``, the same input and the same mask go through both checkpoints (e.g. MAE's one-step
    reconstruction next to DiffMAE's samples), one labelled row (video: row block) per model. Each model samples
    with its own configured sampler unless ``sampler``/``steps``/``eta`` override it; the one used is printed.

    Args:
        ckpt: maskdiff checkpoint (generative models sample RePaint-style, DiffMAE natively; MAE fills the mask in
            one step).
        image: an image file, or ``digits:IDX`` for the IDX-th digit of the embedded validation split.
        video: a video file (``.mp4``, ``.gif``, ...), a folder of frame images, or ``moving_digits:IDX`` for
            validation video IDX of the moving-digits set. Exactly one of ``image`` and ``video``.
        out: output path: a PNG panel for images (default ``inpaint.png``), a ``.gif`` or ``.mp4`` for video
            (default ``inpaint.gif``).
        compare_ckpt: a second checkpoint with the same input and token grid, run on the same input and mask.
        mask: mask PNG, white (nonzero) = generate, of the image's (video: frames') size or aspect ratio; it
            applies to every frame of a clip; overrides ``mask_kind``.
        mask_kind: images: ``random`` patches (aligned to the model's tokens), a ``box``, a ``half`` or an
            ``outpaint`` border (default ``random``); video: ``tube`` (default), ``random`` space-time tokens,
            ``box``/``half``/``outpaint`` in every frame, or ``future`` (generate the last frames).
        mask_ratio: share to generate for ``random``, ``tube``, a centred ``box`` and ``outpaint``, in (0, 1)
            (default 0.5 for images, 0.9 for video).
        masker: which tokens ``random`` generates, a masker by class path (e.g.
            ``maskdiff.corruption.BlockMasker``, with ``--masker.init_args.min_block 2``); default: uniformly
            random tokens.
        box: ``[x0, y0, x1, y1]`` as fractions of the side for ``box`` (e.g. ``--box [0.25,0.25,0.75,0.75]``).
        side: the half to generate for ``half``.
        future_frames: frames to generate for ``future`` (default half the clip).
        start_frame: first frame of the video to use.
        fps: frame rate of the written animation.
        label: class to condition on (default: the digit's own label for ``digits:IDX``, else unconditional).
        samples: results to draw (one for deterministic methods such as MAE).
        sampler: ``ddpm`` (ancestral, respaced), ``ddim``, or ``first_step`` (x̂0 from pure noise at t = T - 1 in
            one call: a diffusion model's MAE-like reconstruction, :class:`FirstStepSampler`); default: each
            checkpoint's own.
        steps: respaced sampling steps (``ddpm``, ``ddim``); default: the checkpoint sampler's.
        eta: DDIM η (0 = deterministic); default: the checkpoint's DDIM η, else 0.
        cfg_scale: classifier-free guidance scale (1 = off); default: the guidance stored with the method, or none.
        seed: seeds the random mask and the sampling noise (the same for both checkpoints of a comparison).
        weights: ``ema`` or ``raw`` backbone weights.
        device: torch device to run on.
        progress: a bar of each model's sampling steps on stderr; default: when stderr is a terminal (or
            ``MASKDIFF_PROGRESS=1``).
    """
    if (image is None) == (video is None):
        raise ValueError("pass exactly one of --image (an image or digits:IDX) and --video (a clip, frames folder or moving_digits:IDX)")
    if samples < 1:
        raise ValueError(f"samples must be at least 1, got {samples}")
    if mask_ratio is not None:
        check_ratio(mask_ratio)
    if masker is not None and (mask is not None or (mask_kind or ("tube" if video else "random")) != "random"):
        raise ValueError(f"--masker {masker!r} chooses the tokens of --mask_kind random; pass --mask_kind random "
                         "and no --mask")
    out = out or ("inpaint.gif" if video is not None else "inpaint.png")
    ensure_writable_directory(Path(out).expanduser().parent, "--out directory")
    module = load_method(ckpt, map_location=device).to(device).eval()
    models = [(module, ckpt)]
    if compare_ckpt is not None:
        other = load_method(compare_ckpt, map_location=device).to(device).eval()
        check_same_geometry(module, other, ckpt, compare_ckpt)
        models.append((other, compare_ckpt))
    for model, path in models:
        if weights == "ema" and model.ema_backbone is None:
            print(f"note: {path} has no EMA weights; inpainting with the raw weights", file=sys.stderr)
        elif weights == "ema" and model.young_ema_note() is not None:
            print(f"warning: {path}: {model.young_ema_note()}", file=sys.stderr)
    options = {"sampler": sampler, "steps": steps, "eta": eta}
    settings = {"seed": seed, "weights": weights, "masker": masker, "progress": progress}
    if video is not None:
        return inpaint_video(models, video, out, mask, mask_kind or "tube",
                             0.9 if mask_ratio is None else mask_ratio, box, side, future_frames, start_frame, fps,
                             samples, cfg_scale, options, **settings)
    return inpaint_image(models, image, out, mask, mask_kind or "random",
                         0.5 if mask_ratio is None else mask_ratio, box, side, label, samples,
                         {**options, "cfg_scale": cfg_scale}, **settings)


def inpaint_image(models: Models, image: str, out: str, mask: str | None, mask_kind: str, mask_ratio: float,
                  box: list[float] | None, side: str, label: int | None, samples: int, options: dict[str, Any], *,
                  seed: int, weights: str, masker: Masker | None, progress: bool | None) -> str:
    """The image half of :func:`inpaint`; ``options`` go to :func:`build_sampling` for each model."""
    module, ckpt = models[0]
    if module.patchifier.frames is not None:
        raise ValueError(f"{ckpt} is a video model (input {tuple(module.patchifier.sample_shape)}); pass the clip with --video")
    if mask_kind not in MASK_KINDS:
        raise ValueError(f"mask kind {mask_kind!r} is for video; images take one of {', '.join(MASK_KINDS)}")
    token_pixels = module.autoencoder.downsample * module.patchifier.patch_size
    size = module.patchifier.input_size * module.autoencoder.downsample
    channels = module.patchifier.channels if module.autoencoder.latent_channels is None else 3
    picture, own_label, source_size = load_image(image, size, channels)
    generator = torch.Generator().manual_seed(seed)
    if mask is not None:
        pixel_mask = load_mask(mask, size, source_size)
        described_mask = f"mask {mask}"
    else:
        if masker is not None:
            pixel_mask = masker_mask(masker, module.patchifier.grid, mask_ratio, token_pixels, generator=generator)
        else:
            pixel_mask = make_mask(mask_kind, size, mask_ratio, token_pixels, None if box is None else tuple(box), side,
                                   generator)
        detail = {"random": random_mask_note(mask_ratio, masker), "box": f"box {box}" if box else f"centred, ratio {mask_ratio}",
                  "half": side, "outpaint": f"ratio {mask_ratio}"}[mask_kind]
        described_mask = f"{mask_kind} mask ({detail})"
    tokens = token_mask(pixel_mask[None], token_pixels)
    label = own_label if label is None else label

    rows, notes = [], []
    greyed = torch.where(pixel_mask, torch.zeros_like(picture), picture)
    for model, path in models:
        if model.conditional and label is not None and not 0 <= label < model.backbone.num_classes:
            raise ValueError(f"label {label} is outside [0, {model.backbone.num_classes}) for {path}")
        conditioned = model.conditional and label is not None
        draws = draws_for(model, samples)
        sampling = build_sampling(model, **options)
        name = model_label(model, path, models)
        bar, advance = chain_progress(model, tokens, sampling, name, progress)
        with bar:
            results = model.inpaint(
                picture.expand(draws, -1, -1, -1), pixel_mask, torch.full((draws,), label) if conditioned else None,
                sampler=sampling.sampler, guidance=sampling.guidance, generator=torch.Generator().manual_seed(seed),
                use_ema=weights == "ema", callback=advance,
            ).cpu()
        rows.append((name, torch.cat([picture[None], greyed[None], results])))
        notes.append(f"{type(model).__name__}: {'label ' + str(label) if conditioned else 'unconditional'}, {draws} result(s), "
                     f"{sampling_note(sampling, seed, conditioned)}")
    if len(rows) == 1:
        path = save_grid(upscale(rows[0][1]), out, per_row=len(rows[0][1]))
    else:
        path = save_panel([(name, upscale(tiles)) for name, tiles in rows], out, per_row=max(len(t) for _, t in rows))
    print(
        f"wrote {path}: inpainting of {image} at {size}x{size}, {described_mask}: "
        f"{pixel_mask.float().mean().item():.1%} of pixels masked, {int(tokens.sum())}/{tokens.numel()} tokens generated; "
        f"{'; '.join(notes)}; {weights} weights"
    )
    return str(path)


def inpaint_video(models: Models, video: str, out: str, mask: str | None, mask_kind: str, mask_ratio: float,
                  box: list[float] | None, side: str, future_frames: int | None, start_frame: int, fps: int,
                  samples: int, cfg_scale: float | None, options: dict[str, Any], *, seed: int, weights: str,
                  masker: Masker | None, progress: bool | None) -> str:
    """The video half of :func:`inpaint`; ``options`` go to :func:`build_sampling` for each model."""
    module, ckpt = models[0]
    patchifier = module.patchifier
    if patchifier.frames is None:
        raise ValueError(f"{ckpt} is an image model (input {tuple(patchifier.sample_shape)}, no frames); --video needs "
                         "a video model such as DiffMAE trained with configs/diffmae/diffmae_moving_digits.yaml")
    if Path(out).suffix.lower() not in ANIMATION_SUFFIXES:
        raise ValueError(f"video output {out} must end in {' or '.join(ANIMATION_SUFFIXES)}")
    if mask_kind not in VIDEO_MASK_KINDS:
        raise ValueError(f"unknown video mask kind {mask_kind!r}; expected one of {', '.join(VIDEO_MASK_KINDS)}")
    if cfg_scale is not None:
        print("note: video inpainting is unconditional; --cfg_scale is ignored", file=sys.stderr)
    num_frames, tubelet = patchifier.frames, patchifier.tubelet
    token_pixels = module.autoencoder.downsample * patchifier.patch_size
    size = patchifier.input_size * module.autoencoder.downsample
    channels = patchifier.channels if module.autoencoder.latent_channels is None else 3
    if video.startswith(MOVING_DIGITS_PREFIX):
        raw, own_label = load_moving_digits_clip(video, start_frame + num_frames)
        source = f"{video} (label {own_label})"
    else:
        raw, source = read_video_frames(video, channels), video
    clip = fit_clip(raw, num_frames, size, channels, start_frame, tubelet)
    generator = torch.Generator().manual_seed(seed)
    if mask is not None:
        pixel_mask = load_mask(mask, size, (raw.shape[2], raw.shape[1])).expand(num_frames, -1, -1).clone()
        described_mask = f"mask {mask} in every frame"
    else:
        if masker is not None:
            pixel_mask = masker_mask(masker, patchifier.grid, mask_ratio, token_pixels, tubelet, generator)
        else:
            pixel_mask = make_video_mask(mask_kind, num_frames, size, tubelet, token_pixels, mask_ratio,
                                         None if box is None else tuple(box), side, future_frames, generator)
        if mask_kind == "future":
            detail = f"last {int(pixel_mask.flatten(1).any(1).sum())} frames"
        else:
            detail = random_mask_note(mask_ratio, masker)
        described_mask = f"{mask_kind} mask ({detail})"
    tokens = token_mask(pixel_mask, token_pixels, tubelet)

    greyed = torch.where(pixel_mask, torch.zeros_like(clip), clip)
    blocks, notes = [], []
    for model, path in models:
        draws = draws_for(model, samples)
        sampling = build_sampling(model, **options)
        name = model_label(model, path, models)
        bar, advance = chain_progress(model, tokens, sampling, name, progress)
        with bar:
            results = inpaint_clip(model, clip, pixel_mask, draws, sampling.sampler,
                                   torch.Generator().manual_seed(seed), weights == "ema", advance)
        blocks.append((name, results))
        notes.append(f"{name}: {draws} result(s), {sampling_note(sampling, seed, False)}")

    def frames_of(clips: torch.Tensor) -> torch.Tensor:
        return upscale(clips.transpose(0, 1))  # (C, F, S, S) -> (F, C, S', S')

    strip_rows = [("original", frames_of(clip)), ("masked", frames_of(greyed))]
    for name, results in blocks:
        strip_rows += [(f"{name} #{k + 1}", frames_of(result)) for k, result in enumerate(results)]
    strip = save_panel(strip_rows, Path(out).with_name(f"{Path(out).stem}_strip.png"), per_row=num_frames)

    per_row = 2 + max(len(results) for _, results in blocks)
    margin = label_width([name for name, _ in blocks])
    moving = [(name, [frames_of(clip), frames_of(greyed)] + [frames_of(result) for result in results])
              for name, results in blocks]
    animation = [
        np.asarray(labelled_panel([(name, torch.stack([part[t] for part in parts])) for name, parts in moving],
                                  per_row, margin))
        for t in range(num_frames)
    ]
    path = write_animation(np.stack(animation), out, fps)
    print(
        f"wrote {path} and {strip}: inpainting of {source}, {num_frames} frames at {size}x{size} (tubelet {tubelet}), "
        f"{described_mask}: {pixel_mask.float().mean().item():.1%} of pixels masked, "
        f"{int(tokens.sum())}/{tokens.numel()} tokens generated; {'; '.join(notes)}; {weights} weights"
    )
    return str(path)
