"""The Corruption contract: clean tokens in, one or more corrupted views out."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from maskdiff.corruption.maskers import Masker, RandomMasker, TubeMasker
from maskdiff.corruption.masking import HiddenTokens, Masking
from maskdiff.diffusion.schedules import NoiseSchedule


@dataclass
class Corrupted:
    """One corrupted view of (part of) a batch: what the backbone sees and what the objective needs.

    Attributes:
        tokens: ``(B_v, N, P)`` backbone input (noisy and/or clean tokens, all N positions; the backbone drops
            hidden ones using ``masking``).
        clean: ``(B_v, N, P)`` the clean tokens of the same rows (targets are built from them).
        rows: rows of the batch this view covers (labels are selected with it).
        t: ``(B_v,)`` long schedule index, or ``None`` for noise-free views.
        model_t: ``(B_v,)`` float, the timestep the backbone is conditioned on (usually ``t``; UMD offsets it so
            that 0 means "no noise"); ``None`` for backbones without time conditioning.
        noise: ``(B_v, N, P)`` the Gaussian noise that was added, or ``None``.
        masking: which tokens the encoder may see, or ``None`` (all).
        schedule: the noise schedule that produced ``tokens`` (objectives read ᾱ_t from it).
        weight: weight of this view's loss in the step total.
        name: short label used in logged loss names (e.g. ``full``, ``masked``).
        conditional: whether class labels reach the backbone for this view (UMD's noise-free view: no, it runs
            with the null class).
    """

    tokens: torch.Tensor
    clean: torch.Tensor
    rows: slice = field(default_factory=lambda: slice(None))
    t: torch.Tensor | None = None
    model_t: torch.Tensor | None = None
    noise: torch.Tensor | None = None
    masking: Masking | None = None
    schedule: NoiseSchedule | None = None
    weight: float = 1.0
    name: str = ""
    conditional: bool = True

    @property
    def noise_free(self) -> bool:
        return self.noise is None

    def region_mask(self, region: str) -> torch.Tensor | None:
        """``(B_v, N)`` float weights of the tokens a loss covers: ``all`` (None), ``masked`` or ``visible``."""
        if region == "all":
            return None
        if region not in ("masked", "visible"):
            raise ValueError(f"unknown loss region {region!r}; expected 'all', 'masked' or 'visible'")
        if self.masking is None:
            raise ValueError(f"loss region {region!r} needs a masking corruption, but this view has no mask")
        hidden = self.masking.mask.to(self.tokens.dtype)
        return hidden if region == "masked" else 1 - hidden


class Corruption(nn.Module):
    """Turns clean tokens into views for the backbone.

    ``forward(clean (B, N, P), grid) -> list[Corrupted]``; most methods return one view, MDT returns two
    (full and masked pass), UMD splits the batch into a noise-free and a noised view. Schedules live here as
    (non-persistent) buffers, so ``schedule`` is the single source of truth for objectives and samplers.

    What a corruption declares (methods check it against the backbone and objective when they are built):

    Attributes:
        schedule: the noise schedule of noised views, ``None`` for noise-free corruptions. A corruption with a
            schedule conditions the backbone on timesteps; generation needs one.
        model_time_offset: added to the schedule index to give the timestep the backbone sees (UMD: 1, its 0 means
            "no noise").
        masker: which tokens masked views hide (:mod:`maskdiff.corruption.maskers`), ``None`` when nothing is hidden.
        mask_ratio: the share of tokens its (main) masked view hides; 0 without a masker.
        hidden_tokens: what the backbone must do with hidden tokens for the views to make sense (see
            :data:`~maskdiff.corruption.masking.HiddenTokens`); empty without a masker.
    """

    schedule: NoiseSchedule | None
    model_time_offset: int = 0
    masker: Masker | None
    mask_ratio: float = 0.0
    hidden_tokens: tuple[HiddenTokens, ...] = ()

    def __init__(self, masker: Masker | None = None) -> None:
        super().__init__()
        self.schedule = None
        self.masker = masker

    def hide(self, batch: int, grid: tuple[int, ...], ratio: float, device) -> Masking:
        """A masking of ``batch`` samples of the token ``grid`` hiding ``ratio`` of the tokens, by this corruption's
        masker."""
        if self.masker is None:
            raise ValueError(f"{type(self).__name__} has no masker, so it cannot hide tokens")
        return self.masker.mask(batch, grid, ratio, device=device)

    def forward(self, clean: torch.Tensor, grid: tuple[int, ...]) -> list[Corrupted]:
        raise NotImplementedError


def chosen_masker(masker: Masker | None, tube: bool) -> Masker:
    """The masker of a masking corruption: ``masker``, or the shorthand ``tube`` (:class:`TubeMasker`, kept for the
    configs and checkpoints that predate maskers), or MAE's :class:`RandomMasker`."""
    if masker is not None and tube:
        raise ValueError(f"give either masker ({masker!r}) or tube: true, not both")
    if masker is not None:
        return masker
    return TubeMasker() if tube else RandomMasker()
