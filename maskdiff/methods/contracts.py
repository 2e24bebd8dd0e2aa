"""The composition check: a method's backbone, corruption, objective and sampler must fit together.

Each part declares what it offers on its base class (:class:`~maskdiff.backbones.base.Backbone`,
:class:`~maskdiff.corruption.base.Corruption`, :class:`~maskdiff.objectives.base.Objective`); :func:`check_composition`
reads those declarations once, when the method is built and before any data is read, and refuses an incompatible
combination with one line that names both parts and what is missing.
"""

from __future__ import annotations

from typing import Literal

from maskdiff.backbones.base import Backbone
from maskdiff.corruption.base import Corruption
from maskdiff.objectives.base import Objective
from maskdiff.samplers.base import Sampler

InpaintingMode = Literal["repaint", "hidden_chain", "reconstruct"]
"""How a method inpaints (:mod:`maskdiff.methods.inpainting`): ``repaint`` (the sampler's chain over all tokens with the
known ones replaced by the noised image at every step: DiT, MDT, UMD), ``hidden_chain`` (the encoder runs once on the
known tokens and the chain runs on the hidden ones only: DiffMAE) or ``reconstruct`` (one pass, the backbone predicts
the hidden tokens from the known ones: MAE)."""

HIDDEN_TOKEN_WORDS = {
    "drop": "drops hidden tokens from its encoder",
    "mask_token": "replaces hidden tokens by a mask token",
    "noised": "denoises the noised values of hidden tokens",
    None: "cannot mask (it always sees every token)",
}


class CompositionError(ValueError):
    """Parts of a method that do not fit together (raised when the method is built)."""


def name(part: object) -> str:
    return type(part).__name__


def generation_gap(corruption: Corruption, objective: Objective) -> str | None:
    """Why the method cannot generate, or ``None`` when it can (a noise schedule and a parameterization)."""
    if objective.parameterization is None:
        return f"objective {name(objective)} declares no parameterization (what its output predicts)"
    if corruption.schedule is None:
        return f"corruption {name(corruption)} has no noise schedule"
    return None


def check_composition(
    method: str,
    backbone: Backbone,
    corruption: Corruption,
    objective: Objective,
    sampler: Sampler | None,
    inpainting: InpaintingMode | None,
) -> None:
    """Refuse parts that do not fit, with one line naming both parts (:class:`CompositionError`)."""
    b, c, o = f"backbone {name(backbone)}", f"corruption {name(corruption)}", f"objective {name(objective)}"

    def refuse(message: str) -> None:
        raise CompositionError(f"{method}: {message}")

    if objective.output_parts != backbone.output_parts:
        refuse(f"{o} expects {objective.output_parts} output part(s) per token but {b} outputs {backbone.output_parts} "
               "(check learn_sigma on both)")
    if corruption.masker is not None:
        if backbone.hidden_tokens is None:
            refuse(f"{c} hides tokens with {corruption.masker!r}, but {b} cannot mask (it always sees every token); "
                   "use a backbone that masks (MDT, MAE, UMD) or an unmasked corruption (GaussianNoise)")
        if backbone.hidden_tokens not in corruption.hidden_tokens:
            wanted = " or ".join(HIDDEN_TOKEN_WORDS[mode] for mode in corruption.hidden_tokens)
            refuse(f"{c} needs a backbone that {wanted}, but {b} {HIDDEN_TOKEN_WORDS[backbone.hidden_tokens]}")
    if corruption.schedule is not None and not backbone.takes_timesteps:
        refuse(f"{c} noises tokens at timesteps, but {b} takes no timesteps; use a diffusion backbone (DiT, MDT, UMD, "
               "DiffMAE) or a noise-free corruption (TokenMasking)")
    if corruption.schedule is None and backbone.takes_timesteps:
        refuse(f"{b} is conditioned on timesteps, but {c} adds no noise and gives none; use a noising corruption "
               "(GaussianNoise, MaskedNoise, UnifiedMaskedNoise, MaskedPatchNoise)")
    if objective.needs_noise and corruption.schedule is None:
        refuse(f"{o} scores denoising predictions, but {c} adds no noise")
    if objective.region != "all" and corruption.masker is None:
        refuse(f"{o} scores the {objective.region} tokens, but {c} hides none (it has no masker)")
    gap = generation_gap(corruption, objective)
    if sampler is not None and gap is not None:
        refuse(f"it samples with {name(sampler)}, but {gap}; declare one or set sampler: null")
    if inpainting == "repaint" and gap is not None:
        refuse(f"repaint inpainting needs a generative method, but {gap}")
    if inpainting == "hidden_chain":
        if backbone.hidden_tokens != "noised":
            refuse(f"hidden_chain inpainting runs the decoder on the hidden tokens alone, but {b} "
                   f"{HIDDEN_TOKEN_WORDS[backbone.hidden_tokens]}; use inpainting: repaint")
        if gap is not None:
            refuse(f"hidden_chain inpainting samples the hidden tokens, but {gap}")
    if inpainting == "reconstruct":
        if backbone.hidden_tokens not in ("drop", "mask_token"):
            refuse(f"reconstruct inpainting predicts hidden tokens from visible ones, but {b} "
                   f"{HIDDEN_TOKEN_WORDS[backbone.hidden_tokens]}")
        if objective.parameterization is not None:
            refuse(f"reconstruct inpainting reads the backbone's output as pixels, but {o} predicts "
                   f"{objective.parameterization.target}; use inpainting: repaint")
