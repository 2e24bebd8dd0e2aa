"""Corruptions of the diffusion family: Gaussian noise at a uniformly drawn timestep, optionally masked."""

from __future__ import annotations

import torch

from maskdiff.corruption.base import Corrupted, Corruption, chosen_masker
from maskdiff.corruption.maskers import Masker
from maskdiff.corruption.masking import HiddenTokens, Masking
from maskdiff.diffusion.schedules import NoiseSchedule, ScheduleName

# Views whose hidden tokens the backbone must not see: its encoder drops them or a mask token replaces them.
UNSEEN: tuple[HiddenTokens, ...] = ("drop", "mask_token")


class GaussianNoise(Corruption):
    """DiT's corruption: ``t ~ U{0..T-1}``, ``x_t = sqrt(ᾱ_t) x0 + sqrt(1-ᾱ_t) ε`` on every token.

    Args:
        schedule: β schedule name (``linear``, ``cosine``, ``rho_linear``).
        num_steps: T.
        beta_start, beta_end, rho, cosine_s: schedule parameters (see :class:`NoiseSchedule`).
    """

    def __init__(
        self,
        schedule: ScheduleName = "linear",
        num_steps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        rho: float = 0.8,
        cosine_s: float = 0.008,
    ) -> None:
        super().__init__()
        self.schedule = NoiseSchedule(schedule, num_steps, beta_start, beta_end, rho, cosine_s)

    def noised(self, clean: torch.Tensor, t: torch.Tensor, name: str = "") -> Corrupted:
        """A view of ``clean (B, N, P)`` noised at ``t (B,)`` with fresh noise."""
        noise = torch.randn_like(clean)
        return Corrupted(
            tokens=self.schedule.q_sample(clean, t, noise),
            clean=clean,
            t=t,
            model_t=t.to(clean.dtype),
            noise=noise,
            schedule=self.schedule,
            name=name,
        )

    def sample_t(self, batch: int, device) -> torch.Tensor:
        return torch.randint(0, self.schedule.num_steps, (batch,), device=device)

    def forward(self, clean: torch.Tensor, grid: tuple[int, ...]) -> list[Corrupted]:
        return [self.noised(clean, self.sample_t(clean.shape[0], clean.device))]


class TokenMasking(Corruption):
    """MAE's corruption: hide a fixed share of tokens per sample, no noise.

    Args:
        mask_ratio: share of tokens hidden from the encoder.
        tube: shorthand for ``masker: TubeMasker`` (video grids ``(t, h, w)``).
        masker: which tokens are hidden (:mod:`maskdiff.corruption.maskers`; default MAE's random masking).
    """

    hidden_tokens = UNSEEN

    def __init__(self, mask_ratio: float = 0.75, tube: bool = False, masker: Masker | None = None) -> None:
        super().__init__(chosen_masker(masker, tube))
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio {mask_ratio} is outside [0, 1)")
        self.mask_ratio = mask_ratio

    def forward(self, clean: torch.Tensor, grid: tuple[int, ...]) -> list[Corrupted]:
        return [Corrupted(tokens=clean, clean=clean, masking=self.hide(clean.shape[0], grid, self.mask_ratio, clean.device))]


class MaskedNoise(GaussianNoise):
    """MDT's corruption: two views of the batch at the same ``t`` with independent noise, a full pass and a
    masked pass whose encoder sees only the kept noisy tokens.

    Args:
        mask_ratio: share of tokens hidden in the masked pass (MDT: 0.3).
        max_mask_ratio: draw one ratio per batch from ``U[mask_ratio, max_mask_ratio]`` (MDTv2: 0.3 to 0.5);
            ``None`` keeps it fixed (MDTv1; also keeps compiled shapes static).
        full_pass: also return the unmasked view (MDT trains on both; ``False`` gives a masked-only ablation).
        schedule, num_steps, beta_start, beta_end, rho, cosine_s: as :class:`GaussianNoise`.
        masker: which tokens the masked pass hides (default MDT's random masking).
    """

    hidden_tokens = UNSEEN

    def __init__(
        self,
        mask_ratio: float = 0.3,
        max_mask_ratio: float | None = None,
        full_pass: bool = True,
        schedule: ScheduleName = "linear",
        num_steps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        rho: float = 0.8,
        cosine_s: float = 0.008,
        masker: Masker | None = None,
    ) -> None:
        super().__init__(schedule, num_steps, beta_start, beta_end, rho, cosine_s)
        self.masker = chosen_masker(masker, tube=False)
        top = mask_ratio if max_mask_ratio is None else max_mask_ratio
        if not 0.0 < mask_ratio <= top < 1.0:
            raise ValueError(
                f"mask ratios must satisfy 0 < mask_ratio <= max_mask_ratio < 1, got {mask_ratio} and {max_mask_ratio}"
            )
        self.mask_ratio = mask_ratio
        self.max_mask_ratio = max_mask_ratio
        self.full_pass = full_pass

    def draw_ratio(self) -> float:
        if self.max_mask_ratio is None:
            return self.mask_ratio
        return self.mask_ratio + float(torch.rand(())) * (self.max_mask_ratio - self.mask_ratio)

    def forward(self, clean: torch.Tensor, grid: tuple[int, ...]) -> list[Corrupted]:
        t = self.sample_t(clean.shape[0], clean.device)
        masked = self.noised(clean, t, name="masked")
        masked.masking = self.hide(clean.shape[0], grid, self.draw_ratio(), clean.device)
        return [self.noised(clean, t, name="full"), masked] if self.full_pass else [masked]


class UnifiedMaskedNoise(GaussianNoise):
    """UMD's corruption: a deterministic batch split into a noised view and a noise-free, high-mask view.

    With ``B`` rows and ``n_clean`` noise-free rows (:meth:`clean_rows`: ``int(B · no_noise_prob)`` in one process;
    under data parallelism the official ``int(global batch · no_noise_prob)`` spread over the ranks):

    * ``noised``: rows ``[0, B - n_clean)``, ``t ~ U{0..T-1}``, ``x_t = √ᾱ_t x0 + √(1-ᾱ_t) ε``, the backbone is
      conditioned on ``t + 1`` (so 0 means "no noise"), ``mask_ratio`` of the tokens hidden, weight ``1 - n_clean/B``;
    * ``clean``: rows ``[B - n_clean, B)``, the clean tokens, timestep 0, ``clean_mask_ratio`` hidden, no labels (the
      null class), weight ``n_clean/B``.

    The weights of the local batch make the ranks' mean loss (what data parallelism averages) the official loss of
    the global batch. A ratio of 0 gives that view no masking; views with no rows are left out. UMD: ``no_noise_prob=0.5``,
    ``clean_mask_ratio=0.75``, ``mask_ratio=0.375``, cosine schedule in pixel space (linear for latents).
    Baselines by configuration: DiT-like ``no_noise_prob=0, mask_ratio=0``; MaskDiT-like ``no_noise_prob=0,
    mask_ratio=0.5``; MAE-like ``no_noise_prob=1``.

    Args:
        no_noise_prob: share r of each batch in the noise-free view (the paper's ``r_{t=0}``).
        clean_mask_ratio: tokens hidden in the noise-free view.
        mask_ratio: tokens hidden in the noised view.
        schedule, num_steps, beta_start, beta_end, rho, cosine_s: as :class:`GaussianNoise`.
        masker: which tokens both views hide (default UMD's random masking).
    """

    model_time_offset = 1
    hidden_tokens = UNSEEN

    def __init__(
        self,
        no_noise_prob: float = 0.5,
        clean_mask_ratio: float = 0.75,
        mask_ratio: float = 0.375,
        schedule: ScheduleName = "cosine",
        num_steps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        rho: float = 0.8,
        cosine_s: float = 0.008,
        masker: Masker | None = None,
    ) -> None:
        super().__init__(schedule, num_steps, beta_start, beta_end, rho, cosine_s)
        self.masker = chosen_masker(masker, tube=False)
        if not 0.0 <= no_noise_prob <= 1.0:
            raise ValueError(f"no_noise_prob {no_noise_prob} is outside [0, 1]")
        for name, ratio in (("clean_mask_ratio", clean_mask_ratio), ("mask_ratio", mask_ratio)):
            if not 0.0 <= ratio < 1.0:
                raise ValueError(f"{name} {ratio} is outside [0, 1); expected the share of tokens to hide")
        self.no_noise_prob = no_noise_prob
        self.clean_mask_ratio = clean_mask_ratio
        self.mask_ratio = mask_ratio
        self.rank = 0
        self.world_size = 1

    def shard(self, rank: int, world_size: int) -> None:
        """Split each global batch of ``world_size`` equal per-rank batches, of which this process holds ``rank``'s
        (the method calls this at setup; one process: rank 0 of 1)."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside the {world_size} ranks")
        self.rank, self.world_size = rank, world_size

    def clean_rows(self, batch: int) -> int:
        """Noise-free rows of this rank's ``batch``: ``int(batch · world_size · no_noise_prob)`` rows of the global
        batch spread over the ranks, the first ``total % world_size`` ranks taking one more (UMD's fine-tune at 256 =
        8 × 32 with r = 0.05: 12 rows, 2 on ranks 0-3 and 1 on ranks 4-7). A rank may get none: parameters only
        that view uses then get no gradient there (under DDP use ``ddp_find_unused_parameters_true``)."""
        share, extra = divmod(int(batch * self.world_size * self.no_noise_prob), self.world_size)
        return share + (self.rank < extra)

    def split(self, batch: int) -> int:
        """Rows in the noised view (the first ones); the rest are noise-free."""
        return batch - self.clean_rows(batch)

    def _masking(self, batch: int, grid: tuple[int, ...], ratio: float, device) -> Masking | None:
        return self.hide(batch, grid, ratio, device) if ratio > 0 else None

    def forward(self, clean: torch.Tensor, grid: tuple[int, ...]) -> list[Corrupted]:
        batch = clean.shape[0]
        n_noise = self.split(batch)
        views = []
        if n_noise > 0:
            rows = slice(0, n_noise)
            noised = self.noised(clean[rows], self.sample_t(n_noise, clean.device), name="noised")
            noised.rows = rows
            noised.model_t = noised.t.to(clean.dtype) + self.model_time_offset
            noised.masking = self._masking(n_noise, grid, self.mask_ratio, clean.device)
            noised.weight = n_noise / batch
            views.append(noised)
        if n_noise < batch:
            rows = slice(n_noise, batch)
            views.append(Corrupted(
                tokens=clean[rows],
                clean=clean[rows],
                rows=rows,
                model_t=torch.zeros(batch - n_noise, dtype=clean.dtype, device=clean.device),
                masking=self._masking(batch - n_noise, grid, self.clean_mask_ratio, clean.device),
                schedule=self.schedule,
                weight=(batch - n_noise) / batch,
                name="clean",
                conditional=False,
            ))
        return views


class MaskedPatchNoise(GaussianNoise):
    """DiffMAE's corruption: hide ``mask_ratio`` of the tokens and noise only those; the visible ones stay clean.

    The view's ``tokens`` ``(B, N, P)`` hold the clean visible tokens and ``x_t = √ᾱ_t x0 + √(1-ᾱ_t) ε`` at the
    hidden ones, ``t ~ U{0..T-1}`` per sample; ``noise`` is ε at hidden tokens and 0 at visible ones (what was added);
    ``masking`` tells the backbone which tokens its encoder may see (the clean visible ones).

    Args:
        mask_ratio: share of tokens hidden and noised, in (0, 1) (DiffMAE: 0.75 for images, 0.9 for video).
        tube: shorthand for ``masker: TubeMasker`` (video grids ``(t, h, w)``, MAE-ST / VideoMAE tubes).
        schedule: β schedule. The paper's schedule (an exponent ρ on the noise, see ``rho_linear``) is unverified;
            ``cosine`` is the default here.
        num_steps, beta_start, beta_end, rho, cosine_s: as :class:`GaussianNoise`.
        masker: which tokens are hidden and noised (default random masking).
    """

    hidden_tokens: tuple[HiddenTokens, ...] = ("noised",)

    def __init__(
        self,
        mask_ratio: float = 0.75,
        tube: bool = False,
        schedule: ScheduleName = "cosine",
        num_steps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        rho: float = 0.8,
        cosine_s: float = 0.008,
        masker: Masker | None = None,
    ) -> None:
        super().__init__(schedule, num_steps, beta_start, beta_end, rho, cosine_s)
        self.masker = chosen_masker(masker, tube)
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(
                f"mask_ratio {mask_ratio} is outside (0, 1); DiffMAE needs both visible tokens to condition on and "
                "hidden tokens to denoise"
            )
        self.mask_ratio = mask_ratio

    def mask(self, batch: int, grid: tuple[int, ...], device) -> Masking:
        masking = self.hide(batch, grid, self.mask_ratio, device)
        if masking.num_keep == 0 or masking.num_keep == masking.mask.shape[1]:
            raise ValueError(
                f"mask_ratio {self.mask_ratio} on a token grid {grid} keeps {masking.num_keep} of "
                f"{masking.mask.shape[1]} tokens; expected at least one visible and one hidden token"
            )
        return masking

    def forward(self, clean: torch.Tensor, grid: tuple[int, ...]) -> list[Corrupted]:
        batch = clean.shape[0]
        masking = self.mask(batch, grid, clean.device)
        t = self.sample_t(batch, clean.device)
        hidden = masking.mask.unsqueeze(-1)
        noise = torch.randn_like(clean) * hidden.to(clean.dtype)
        noisy = self.schedule.q_sample(clean, t, noise)
        return [Corrupted(
            tokens=torch.where(hidden, noisy, clean),
            clean=clean,
            t=t,
            model_t=t.to(clean.dtype),
            noise=noise,
            masking=masking,
            schedule=self.schedule,
        )]
