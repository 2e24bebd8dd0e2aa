"""Grids and panels: small images nearest-upscaled to 64 px (exactly), 1-px white padding, row labels on the left."""

import numpy as np
import pytest
import torch
from PIL import Image

from maskdiff.images import grid_image, label_width, labelled_panel, save_grid, upscale

TILE = 64 + 1  # a 16-px image upscaled 4x plus the grid's 1-px padding


def exact_images(count: int, side: int, channels: int = 1, seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    """``(images (count, C, side, side) in [-1, 1], their uint8 values (count, side, side, C))``: every value is
    ``v / 127.5 - 1`` for an integer ``v``, so that the grid's rounding gives ``v`` back."""
    values = np.random.default_rng(seed).integers(0, 256, size=(count, channels, side, side))
    return torch.tensor(values / 127.5 - 1, dtype=torch.float32), values.transpose(0, 2, 3, 1).astype(np.uint8)


def test_save_grid_upscales_small_images_to_64_px(tmp_path):
    images, _ = exact_images(5, 16)
    path = save_grid(images, tmp_path / "grid.png", 2)
    assert Image.open(path).size == (2 * TILE + 1, 3 * TILE + 1)  # 3 rows, the last one short


def test_a_tile_is_the_exact_nearest_neighbour_upscale_and_blanks_are_white(tmp_path):
    images, values = exact_images(3, 16, channels=3)
    pixels = np.asarray(Image.open(save_grid(images, tmp_path / "grid.png", 2)))
    for index in range(3):
        row, column = divmod(index, 2)
        tile = pixels[1 + row * TILE: row * TILE + TILE, 1 + column * TILE: column * TILE + TILE]
        np.testing.assert_array_equal(tile, values[index].repeat(4, axis=0).repeat(4, axis=1))
    assert (pixels[1 + TILE: 2 * TILE, 1 + TILE: 2 * TILE] == 255).all()  # the fourth place is blank
    assert (pixels[0] == 255).all() and (pixels[:, 0] == 255).all()  # padding


def test_grayscale_tiles_are_grey_rgb_and_large_images_are_not_upscaled():
    images, values = exact_images(2, 8)
    pixels = np.asarray(grid_image(images, 2))
    assert pixels.shape == (8 * 8 + 2, 2 * (8 * 8 + 1) + 1, 3)  # 8 px -> 64 px
    np.testing.assert_array_equal(pixels[1:65, 1:65], values[0].repeat(8, 0).repeat(8, 1).repeat(3, 2))
    assert np.asarray(grid_image(torch.zeros(2, 3, 64, 96), 1)).shape == (2 * 65 + 1, 96 + 2, 3)


def test_row_labels_widen_the_grid_and_are_drawn_left_of_their_rows(tmp_path):
    images = torch.ones(6, 1, 16, 16)  # white tiles: only the labels are dark
    labels = ["0", "1", "2"]
    plain = Image.open(save_grid(images, tmp_path / "plain.png", 2))
    labelled = np.asarray(Image.open(save_grid(images, tmp_path / "labelled.png", 2, row_labels=labels)))
    margin = label_width(labels)
    assert margin > 0 and labelled.shape == (plain.size[1], plain.size[0] + margin, 3)
    for row in range(3):
        band = labelled[1 + row * TILE: row * TILE + TILE, :margin]
        assert (band < 128).any(), row  # its label
    assert (labelled[:, margin:] == 255).all()


def test_wrong_row_labels_and_per_row_are_refused():
    with pytest.raises(ValueError, match="2 row labels for 3 rows"):
        grid_image(torch.zeros(5, 1, 8, 8), 2, row_labels=["a", "b"])
    with pytest.raises(ValueError, match="per_row must be at least 1"):
        grid_image(torch.zeros(5, 1, 8, 8), 0)


def test_panels_upscale_their_tiles_like_grids():
    images, _ = exact_images(2, 16)
    assert torch.equal(upscale(images), images.repeat_interleave(4, 2).repeat_interleave(4, 3))
    panel = labelled_panel([("x", images)], per_row=2, titles=["a", "b"])
    np.testing.assert_array_equal(np.asarray(panel)[-(TILE + 1):, -(2 * TILE + 1):], np.asarray(grid_image(images, 2)))
