"""The settings of ``maskdiff compare`` (``configs/compare/digits.yaml``), one dataclass per stage.

Every knob of the comparison lives in these classes, so ``--print_config`` shows them all and a YAML overlay
(``configs/compare/quick.yaml``) changes any of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from maskdiff.backbones.base import Pooling

GenerationRoute = Literal["native", "finetune", "none"]
MaskKind = Literal["box", "half", "random"]


@dataclass
class MethodSettings:
    """One compared method.

    Args:
        config: the method's own ``maskdiff fit`` config (its recipe); the shared knobs of :class:`PretrainSettings`
            replace its backbone size, data batch, optimizer, schedule, steps and seed.
        generation: how the method is judged as a class-conditional generator: ``native`` (its pre-training is
            class-conditional), ``finetune`` (a short class-conditional fine-tune of the pre-training,
            :class:`GenerativeFineTuneSettings`), or ``none`` (``no_generation`` says why, in the table's footnote).
        no_generation: the reason written in the table when ``generation`` is ``none``.
        pooling: the feature the probes read (``cls``, ``mean`` of the patch tokens, ``prefix_mean`` of UMD's registers).
        sweep_timesteps: probe at each of :attr:`RepresentationSettings.timesteps` and keep the best on held-out
            training digits (DiT, MDT); otherwise a time-conditioned backbone is read at t = 0 on clean input.
    """

    config: str
    generation: GenerationRoute = "none"
    no_generation: str | None = None
    pooling: Pooling = "mean"
    sweep_timesteps: bool = False


@dataclass
class PretrainSettings:
    """What every method's pre-training shares (the rest is the method's own recipe).

    Args:
        steps: optimizer steps of each pre-training.
        batch_size: training batch.
        input_size, patch_size, hidden_size, depth, num_heads: the backbone's size (every method's encoder).
        lr, betas, weight_decay: AdamW.
        warmup_steps, min_lr_ratio: ``WarmupCosineLR`` over ``steps``.
        gradient_clip_val: gradient norm clipping (null: none).
        timing_skip_steps: first steps left out of the images/s measurement (warm-up).
    """

    steps: int = 2000
    batch_size: int = 64
    input_size: int = 16
    patch_size: int = 4
    hidden_size: int = 128
    depth: int = 4
    num_heads: int = 4
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    gradient_clip_val: float | None = 1.0
    timing_skip_steps: int = 5


@dataclass
class GenerativeFineTuneSettings:
    """The class-conditional fine-tune of methods with ``generation: finetune`` (UMD's recipe).

    Args:
        config: the fine-tune config (its own optimizer and corruption; backbone size from the pre-training).
        steps: its optimizer steps.
    """

    config: str = "configs/umd/umd_finetune_digits.yaml"
    steps: int = 500


@dataclass
class GenerationSettings:
    """Class-conditional sampling, judged by the digits judge (EMA weights, fixed noise).

    Args:
        per_class: samples per digit.
        cfg_scale: classifier-free guidance scale (1: none).
        sampler_steps: DDIM steps (also the inpainting chains' steps).
        eta: DDIM η (0: deterministic).
    """

    per_class: int = 30
    cfg_scale: float = 2.0
    sampler_steps: int = 50
    eta: float = 0.0


@dataclass
class InpaintingSettings:
    """The same masks on the same held-out digits for every method.

    Args:
        masks: ``box`` (a centred square of ``box_ratio`` of the area), ``half`` (the ``side`` half), ``random``
            (``random_ratio`` of the tokens, drawn per image from ``seed``).
        box_ratio, side, random_ratio: the masks' geometry.
        images: held-out digits to inpaint (the first ones of the validation split).
        conditioned: give class-conditional models the digit's label (false: every method sees the visible pixels only).
        panel_images: digits shown in the panel (one row per method, the ``random`` mask).
    """

    masks: list[MaskKind] = field(default_factory=lambda: ["box", "half", "random"])
    box_ratio: float = 0.25
    side: Literal["left", "right", "top", "bottom"] = "left"
    random_ratio: float = 0.75
    images: int = 300
    conditioned: bool = False
    panel_images: int = 6


@dataclass
class RepresentationSettings:
    """Linear and few-shot probes of frozen features (EMA weights where a method keeps them).

    Args:
        timesteps: the sweep for ``sweep_timesteps`` methods: t = 0 reads clean input, t > 0 input noised to t with
            the method's schedule (the backbone conditioned on that step).
        selection_fraction: share of the training digits held out to pick the sweep's timestep (by linear probe).
        epochs, batch_size, base_lr, warmup_epochs: the linear probe (BN + linear head, SGD with momentum).
        shots, l2_reg: the few-shot probe (big_vision ``fewshot_lsr``).
        feature_batch_size: images per forward pass when extracting features and reading the held-out digits.
    """

    timesteps: list[int] = field(default_factory=lambda: [0, 50, 100, 250])
    selection_fraction: float = 0.2
    epochs: int = 90
    batch_size: int = 256
    base_lr: float = 0.1
    warmup_epochs: int = 10
    shots: int = 10
    l2_reg: float = 1024.0
    feature_batch_size: int = 256


@dataclass
class FineTuneSettings:
    """Classification fine-tune of every pre-trained encoder (``maskdiff.methods.FineTune``).

    Args:
        config: the fine-tune config (head, layer decay, optimizer); its checkpoint, timestep and weights are set
            per method.
        steps: optimizer steps (0: skip, the table shows "—").
    """

    config: str = "configs/finetune_digits.yaml"
    steps: int = 300
