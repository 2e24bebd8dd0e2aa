"""A panel of held-out images, their masked view and the method's inpainting (MAE: its reconstruction), drawn during
training and sent to the run's image-aware loggers."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import lightning as L
import torch

from maskdiff.callbacks.image_logging import PeriodicPicture
from maskdiff.errors import UserError
from maskdiff.images import labelled_panel
from maskdiff.inpainting.masks import make_mask
from maskdiff.samplers.base import Sampler

class InpaintingPanel(PeriodicPicture):
    """Every ``every_n_steps`` optimizer steps and at the end of fitting: hide the same tokens of the first
    ``num_images`` validation images, fill them with the method's own inpainting mode (``repaint``, DiffMAE's
    ``hidden_chain``, MAE's ``reconstruct``) and write a panel with the rows original / masked / inpainted under
    ``<log dir>/<dirname>/`` (a PNG, small images upscaled to 64 px) and to TensorBoard or W&B (tag ``dirname``).

    Args:
        every_n_steps: draw every N optimizer steps (0 = only at the end).
        num_images: held-out images in the panel (the first ones of ``val_dataloader()``).
        mask: ``random`` (``ratio`` of the tokens, drawn per image with ``seed``), ``box`` (a centred square of area
            ``ratio``) or ``half`` (the ``side`` half), on the token grid, so the hidden count is the same in every
            image.
        ratio: share of the tokens hidden (``random``, ``box``).
        side: ``left``, ``right``, ``top`` or ``bottom`` for ``half``.
        seed: seeds the random masks and the sampling noise; the same seed gives the same panel for the same weights.
        sampler: overrides the method's sampler (a short DDIM keeps in-training panels cheap); unused by ``reconstruct``.
        use_ema: inpaint with the EMA backbone when there is one.
        dirname: folder under the log directory, and the logger tag.
    """

    def __init__(
        self,
        every_n_steps: int = 0,
        num_images: int = 8,
        mask: Literal["random", "box", "half"] = "random",
        ratio: float = 0.75,
        side: Literal["left", "right", "top", "bottom"] = "left",
        seed: int = 0,
        sampler: Sampler | None = None,
        use_ema: bool = True,
        dirname: str = "inpainting",
    ) -> None:
        if every_n_steps < 0 or num_images < 1:
            raise ValueError(f"InpaintingPanel needs every_n_steps >= 0 and num_images >= 1, got {every_n_steps} and "
                             f"{num_images}")
        self.every_n_steps = every_n_steps
        self.num_images = num_images
        self.mask = mask
        self.ratio = ratio
        self.side = side
        self.seed = seed
        self.sampler = sampler
        self.use_ema = use_ema
        self.dirname = dirname
        self.last_path: Path | None = None
        self._batch: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def setup(self, trainer: L.Trainer, pl_module, stage: str) -> None:
        if pl_module.inpainting is None:
            raise UserError(f"InpaintingPanel: {type(pl_module).__name__} has no inpainting mode (set "
                            "model.init_args.inpainting, or drop the callback)")
        if pl_module.patchifier.frames is not None:
            raise UserError("InpaintingPanel draws images; for video clips use maskdiff inpaint --video")

    def token_mask(self, count: int, grid: tuple[int, int]) -> torch.Tensor:
        """``(count, N)`` bool, True = hidden, ``N = grid[0] * grid[1]`` tokens."""
        generator = torch.Generator().manual_seed(self.seed)
        masks = [make_mask(self.mask, grid[0], self.ratio, side=self.side, generator=generator) for _ in range(count)]
        return torch.stack(masks).flatten(1)

    def held_out(self, trainer: L.Trainer) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The first ``num_images`` validation inputs ``(B, ...)`` and labels ``(B,)`` (or None), read once."""
        if self._batch is None:
            datamodule = trainer.datamodule
            if datamodule is None:
                raise UserError("InpaintingPanel needs a data module with val_dataloader() for its held-out images")
            inputs, labels = [], []
            for batch in datamodule.val_dataloader():
                inputs.append(batch[0])
                labels.append(batch[1] if len(batch) > 1 else None)
                if sum(len(part) for part in inputs) >= self.num_images:
                    break
            label_tensor = torch.cat(labels)[: self.num_images] if labels and labels[0] is not None else None
            self._batch = torch.cat(inputs)[: self.num_images], label_tensor
        return self._batch

    @torch.no_grad()
    def draw(self, trainer: L.Trainer, pl_module) -> list[tuple[str, torch.Tensor]]:
        """The panel's rows ``[(name, images (B, C, H, W) in [-1, 1])]``: original, masked (hidden pixels grey),
        inpainted."""
        inputs, labels = self.held_out(trainer)
        tokens = pl_module.batch_tokens(inputs.to(pl_module.device))
        hidden = self.token_mask(len(tokens), pl_module.patchifier.grid).to(tokens.device)
        filled = pl_module.inpaint_tokens(tokens, hidden, labels, sampler=self.sampler,
                                          generator=torch.Generator().manual_seed(self.seed), use_ema=self.use_ema)
        decode = pl_module.autoencoder.decode
        original = decode(pl_module.patchifier.unpatchify(tokens)).float().cpu()
        inpainted = decode(pl_module.patchifier.unpatchify(filled)).float().cpu()
        pixels_per_token = original.shape[-1] // pl_module.patchifier.grid[-1]
        grid = pl_module.patchifier.grid
        pixel_mask = hidden.view(-1, 1, *grid).cpu()
        pixel_mask = pixel_mask.repeat_interleave(pixels_per_token, 2).repeat_interleave(pixels_per_token, 3)
        masked = torch.where(pixel_mask, torch.zeros_like(original), original)
        return [("original", original), ("masked", masked), ("inpainted", inpainted)]

    def picture(self, trainer: L.Trainer, pl_module):
        panel = labelled_panel(self.draw(trainer, pl_module), self.num_images)
        return panel, f"inpainting panel ({pl_module.inpainting}, {self.mask} mask)"
