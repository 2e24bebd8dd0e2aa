"""InpaintingPanel: held-out digits, their masked view and the method's inpainting, as a PNG and a TensorBoard image."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image

from maskdiff.backbones import DiffMAE as DiffMAEBackbone
from maskdiff.backbones import MAE as MAEBackbone
from maskdiff.callbacks import InpaintingPanel
from maskdiff.data import DigitsDataModule
from maskdiff.images import label_width
from maskdiff.methods import MAE, DiffMAE
from maskdiff.samplers import DDIMSampler
from tests.callbacks.test_image_logging import tensorboard_images

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE, PATCH, IMAGES = 8, 2, 3
TILE = 64 + 1  # an 8 px digit upscaled to 64 px, and its 1 px padding


def tiny_method(kind: str):
    common = dict(input_size=SIZE, patch_size=PATCH, in_channels=1, hidden_size=32, depth=1, num_heads=2,
                  decoder_hidden_size=32, decoder_depth=1, decoder_num_heads=2)
    if kind == "mae":
        return MAE(backbone=MAEBackbone(**common))
    return DiffMAE(backbone=DiffMAEBackbone(**common), sampler=DDIMSampler(2))


def fit_with_panel(tmp_path, kind: str):
    """A one-step fit of a tiny ``kind`` with the panel and a TensorBoard logger: ``(panel, logger, trainer, module)``."""
    L.seed_everything(0)
    panel = InpaintingPanel(num_images=IMAGES, mask="random", ratio=0.75, seed=3)
    tensorboard = TensorBoardLogger(tmp_path / "tb", name=kind)
    trainer = L.Trainer(accelerator="cpu", max_steps=1, limit_val_batches=0, num_sanity_val_steps=0,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        logger=tensorboard, callbacks=[panel], default_root_dir=tmp_path)
    module = tiny_method(kind)
    trainer.fit(module, datamodule=DigitsDataModule(image_size=SIZE, batch_size=8))
    return panel, tensorboard, trainer, module


@pytest.mark.parametrize("kind", ["mae", "diffmae"])
def test_panel_shows_the_hidden_tokens_filled_and_reaches_tensorboard(tmp_path, digits_cache, kind):
    panel, tensorboard, trainer, module = fit_with_panel(tmp_path, kind)
    assert panel.last_path == tmp_path / "tb" / kind / "version_0" / "inpainting" / "final.png"
    written = np.asarray(Image.open(panel.last_path).convert("RGB"))
    margin = label_width(["original", "masked", "inpainted"])
    assert written.shape == (3 * TILE + 1, margin + IMAGES * TILE + 1, 3)
    [(step, logged)] = tensorboard_images(tensorboard.log_dir, "inpainting")
    assert step == 1
    np.testing.assert_array_equal(logged, written)

    rows = dict(panel.draw(trainer, module))
    grid = SIZE // PATCH
    tokens = panel.token_mask(IMAGES, (grid, grid)).view(IMAGES, 1, grid, grid)
    assert tokens.flatten(1).sum(1).tolist() == [12] * IMAGES  # 75 % of the 16 tokens
    hidden = tokens.repeat_interleave(PATCH, 2).repeat_interleave(PATCH, 3)
    torch.testing.assert_close(rows["masked"], torch.where(hidden, 0.0, rows["original"]), rtol=0, atol=0)
    torch.testing.assert_close(rows["inpainted"][~hidden.expand_as(rows["original"])],
                               rows["original"][~hidden.expand_as(rows["original"])], rtol=0, atol=0)
    assert not torch.equal(rows["inpainted"], rows["original"])
    again = dict(panel.draw(trainer, module))
    torch.testing.assert_close(again["inpainted"], rows["inpainted"], rtol=0, atol=0)  # seeded: the same panel


def test_token_masks_hide_the_same_count_in_every_image_and_bad_settings_are_refused():
    masks = InpaintingPanel(mask="random", ratio=0.75, seed=0).token_mask(4, (4, 4))
    assert masks.shape == (4, 16) and masks.sum(1).tolist() == [12, 12, 12, 12]
    assert len({tuple(row.tolist()) for row in masks}) > 1  # drawn per image
    half = InpaintingPanel(mask="half", side="left").token_mask(2, (4, 4)).view(2, 4, 4)
    assert half[:, :, :2].all() and not half[:, :, 2:].any()
    with pytest.raises(ValueError, match="num_images >= 1"):
        InpaintingPanel(num_images=0)
