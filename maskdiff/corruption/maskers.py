"""Maskers: which tokens a corruption hides, as a component plugged by ``class_path``.

Every masker returns a :class:`~maskdiff.corruption.masking.Masking` that hides the same number of tokens in every
sample, so masked batches stay rectangular. The hidden share comes from the corruption (MDTv2 draws it per batch,
UMD uses two), the pattern from the masker:

* :class:`RandomMasker`: MAE's per-sample uniform random masking (argsort of uniform noise);
* :class:`TubeMasker`: VideoMAE / MAE-ST tubes, the same spatial cells hidden in every frame of a clip;
* :class:`BlockMasker`: BEiT-style blocks, contiguous rectangles of patches.

In YAML::

    corruption:
      class_path: maskdiff.corruption.TokenMasking
      init_args:
        mask_ratio: 0.75
        masker:
          class_path: maskdiff.corruption.BlockMasker
          init_args: {min_block: 2}
"""

from __future__ import annotations

import math

import torch

from maskdiff.corruption.masking import Masking, masking_from_noise, num_kept, random_masking, tube_masking


class Masker:
    """``mask(batch, grid, ratio, device, generator) -> Masking`` hiding ``N - int(N * (1 - ratio))`` tokens per
    sample of a row-major token ``grid`` (``(h, w)`` images, ``(t, h, w)`` clips; a tube keeps whole tubes).

    ``generator`` (a CPU generator) makes the masks reproducible; without it the global torch generator is used.
    ``video_only``: the masker needs a ``(t, h, w)`` grid.
    """

    video_only: bool = False

    def mask(
        self,
        batch: int,
        grid: tuple[int, ...],
        ratio: float,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> Masking:
        raise NotImplementedError

    def check_grid(self, grid: tuple[int, ...]) -> None:
        """Refuse a grid the masker cannot cover (called by corruptions when they first see one)."""
        if self.video_only and len(grid) != 3:
            raise ValueError(f"{type(self).__name__} needs a video token grid (t, h, w), got {tuple(grid)}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class RandomMasker(Masker):
    """MAE's ``random_masking``: independent uniform random masks (images and clips alike)."""

    def mask(self, batch, grid, ratio, device=None, generator=None) -> Masking:
        return random_masking(batch, math.prod(grid), ratio, device=device, generator=generator)


class TubeMasker(Masker):
    """Video tubes: one random spatial mask per clip, hiding the same ``(h, w)`` cells in every frame; the kept count
    is ``t * int(h * w * (1 - ratio))``."""

    video_only = True

    def mask(self, batch, grid, ratio, device=None, generator=None) -> Masking:
        self.check_grid(grid)
        return tube_masking(batch, grid, ratio, device=device, generator=generator)


class BlockMasker(Masker):
    """BEiT's blockwise masking: hide rectangles of patches until the hidden count is reached.

    Each rectangle has an area drawn uniformly from ``[min_block, max(min_block, hidden_left)]`` patches and an aspect
    ratio log-uniform in ``[min_aspect, 1 / min_aspect]``; it is placed uniformly in the grid, and only its cells not
    yet hidden count (BEiT's ``MaskingGenerator``). The last rectangle is cut to its first cells in row-major order,
    so every sample hides exactly ``N - int(N * (1 - ratio))`` patches. A clip ``(t, h, w)`` gets one spatial block
    pattern repeated in every frame (blocks as tubes).

    Args:
        min_block: smallest rectangle in patches (BEiT: 16 on a 14×14 grid).
        min_aspect: the aspect ratio lies in ``[min_aspect, 1 / min_aspect]`` (BEiT: 0.3).
        max_tries: placements tried per rectangle before the remaining cells are hidden at random positions
            (only reached on grids far smaller than ``min_block`` allows).
    """

    def __init__(self, min_block: int = 4, min_aspect: float = 0.3, max_tries: int = 10) -> None:
        if min_block < 1:
            raise ValueError(f"min_block {min_block} must be at least 1 patch")
        if not 0.0 < min_aspect <= 1.0:
            raise ValueError(f"min_aspect {min_aspect} is outside (0, 1]")
        if max_tries < 1:
            raise ValueError(f"max_tries {max_tries} must be at least 1")
        self.min_block = min_block
        self.min_aspect = min_aspect
        self.max_tries = max_tries

    def __repr__(self) -> str:
        return f"BlockMasker(min_block={self.min_block}, min_aspect={self.min_aspect})"

    def _uniform(self, generator: torch.Generator | None) -> float:
        return float(torch.rand((), generator=generator))

    def spatial_mask(self, height: int, width: int, hidden: int, generator: torch.Generator | None) -> torch.Tensor:
        """``(height, width)`` bool with exactly ``hidden`` True cells laid out as rectangles."""
        mask = torch.zeros(height, width, dtype=torch.bool)
        count = 0
        log_aspect = (math.log(self.min_aspect), -math.log(self.min_aspect))
        while count < hidden:
            left_to_hide = hidden - count
            placed = False
            for _ in range(self.max_tries):
                top_area = max(self.min_block, left_to_hide)
                area = self.min_block + self._uniform(generator) * (top_area - self.min_block)
                aspect = math.exp(log_aspect[0] + self._uniform(generator) * (log_aspect[1] - log_aspect[0]))
                rows = min(max(int(round(math.sqrt(area * aspect))), 1), height)
                cols = min(max(int(round(math.sqrt(area / aspect))), 1), width)
                top = int(self._uniform(generator) * (height - rows + 1))
                left = int(self._uniform(generator) * (width - cols + 1))
                block = torch.zeros_like(mask)
                block[top : top + rows, left : left + cols] = True
                fresh = (block & ~mask).flatten().nonzero().squeeze(1)
                if len(fresh) == 0:
                    continue
                mask.view(-1)[fresh[:left_to_hide]] = True
                count += min(len(fresh), left_to_hide)
                placed = True
                break
            if not placed:
                free = (~mask).flatten().nonzero().squeeze(1)
                chosen = free[torch.randperm(len(free), generator=generator)[:left_to_hide]]
                mask.view(-1)[chosen] = True
                count = hidden
        return mask

    def mask(self, batch, grid, ratio, device=None, generator=None) -> Masking:
        if len(grid) not in (2, 3):
            raise ValueError(f"BlockMasker needs an (h, w) or (t, h, w) token grid, got {tuple(grid)}")
        frames, (height, width) = (grid[0] if len(grid) == 3 else 1), grid[-2:]
        cells = height * width
        hidden = cells - num_kept(cells, ratio)
        spatial = torch.stack([self.spatial_mask(height, width, hidden, generator).flatten() for _ in range(batch)])
        hidden_tokens = spatial.repeat(1, frames)
        # Kept tokens first in a random order (MAE's shuffle convention), then the hidden ones.
        noise = hidden_tokens.float() + 0.5 * torch.rand(hidden_tokens.shape, generator=generator)
        masking = masking_from_noise(noise, hidden_tokens.shape[1] - frames * hidden)
        return Masking(masking.mask.to(device), masking.ids_keep.to(device), masking.ids_restore.to(device))
