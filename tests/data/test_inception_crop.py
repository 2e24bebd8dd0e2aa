"""big_vision's inception crop (UMD's ``decode_jpeg_and_inception_crop(size, area_min)``): TensorFlow's
``sample_distorted_bounding_box`` boxes, a bilinear resize without antialiasing, and the evaluation resize + crop."""

import io
import math
import random

import numpy as np
import pytest
import torch
from PIL import Image

from maskdiff.data.streams import ImageDecoder
from maskdiff.data.transforms import (
    Box,
    decode_pixels,
    inception_crop,
    inception_crop_box,
    resize_small_central_crop,
    tf_bilinear_resize,
)

RATIO = (0.75, 1.33)  # big_vision's ratio_min / ratio_max


@pytest.mark.parametrize("area_min", [0.8, 0.95, 0.05])
@pytest.mark.parametrize(("height", "width", "largest"), [(375, 500, 0.998), (500, 333, 0.888), (64, 64, 1.0)])
def test_boxes_cover_the_area_range_within_the_image(height, width, largest, area_min):
    """Every box covers area_min to 1 of the image with w/h in [0.75, 1.33] (up to rounding the width), and the
    draws reach both ends of what fits (a 500 x 333 image holds at most 333 x 444 at ratio 0.75: 0.888)."""
    rng = random.Random(0)
    if largest < area_min:  # nothing fits: every try fails and the whole image is taken
        assert inception_crop_box(height, width, (area_min, 1.0), RATIO, rng) == Box(0, 0, height, width)
        return
    fractions = []
    for _ in range(400):
        box = inception_crop_box(height, width, (area_min, 1.0), RATIO, rng)
        assert 0 <= box.top and box.top + box.height <= height and 0 <= box.left and box.left + box.width <= width
        assert RATIO[0] - 0.5 / box.height <= box.width / box.height <= RATIO[1] + 0.5 / box.height
        assert box.top < height - box.height or box.top == 0  # TF's offsets never reach the far edge
        fractions.append(box.height * box.width / (height * width))
    assert area_min <= min(fractions) < area_min + 0.05 * (1 - area_min) + 1 / min(height, width)
    assert largest - 0.1 * (1 - area_min) < max(fractions) <= largest


def test_height_is_uniform_over_the_integers_of_the_area_range():
    """TF draws the height, not the area, uniformly: for a 100 x 100 image at ratio 1 the side is uniform in
    [round(sqrt(0.8) * 100), 100] = [89, 100], and 89 (area 0.7921 < 0.8) is bumped to 90."""
    rng = random.Random(1)
    sides = [inception_crop_box(100, 100, (0.8, 1.0), (1.0, 1.0), rng).height for _ in range(6000)]
    counts = np.bincount(sides, minlength=101)[89:]
    assert counts[0] == 0 and set(np.nonzero(counts)[0] + 89) == set(range(90, 101))
    share = counts / 6000
    assert abs(share[1] - 2 / 12) < 0.02 and np.abs(share[2:] - 1 / 12).max() < 0.02


def test_impossible_constraints_fall_back_to_the_whole_image_and_draws_are_seeded():
    assert inception_crop_box(10, 1000, (0.8, 1.0), RATIO, random.Random(0)) == Box(0, 0, 10, 1000)
    boxes = [inception_crop_box(375, 500, (0.8, 1.0), RATIO, random.Random(seed)) for seed in (3, 3, 4)]
    assert boxes[0] == boxes[1] != boxes[2]


def tf_half_pixel_bilinear(image: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """TF2 ``resize_bilinear`` with half-pixel centres, written from its definition (float64, then truncated)."""
    in_h, in_w = image.shape[-2:]

    def weights(out_size, in_size):
        source = (np.arange(out_size) + 0.5) * in_size / out_size - 0.5
        low = np.floor(source)
        frac = source - low
        return np.clip(low, 0, in_size - 1).astype(int), np.clip(low + 1, 0, in_size - 1).astype(int), frac

    y0, y1, fy = weights(out_h, in_h)
    x0, x1, fx = weights(out_w, in_w)
    top = image[..., y0, :][..., x0] * (1 - fx) + image[..., y0, :][..., x1] * fx
    bottom = image[..., y1, :][..., x0] * (1 - fx) + image[..., y1, :][..., x1] * fx
    out = top * (1 - fy)[:, None] + bottom * fy[:, None]
    return np.clip(out, 0, 255).astype(np.uint8)


@pytest.mark.parametrize(("out_h", "out_w"), [(64, 64), (37, 23), (300, 200)])
def test_resize_is_tf_bilinear_without_antialias(out_h, out_w):
    pixels = torch.randint(0, 256, (3, 113, 89), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    resized = tf_bilinear_resize(pixels, out_h, out_w)
    expected = tf_half_pixel_bilinear(pixels.double().numpy(), out_h, out_w)
    assert resized.shape == (3, out_h, out_w) and resized.dtype == torch.uint8
    assert np.abs(resized.numpy().astype(int) - expected.astype(int)).max() <= 1  # float32 vs float64 at truncation
    assert (resized.numpy() == expected).mean() > 0.99


def test_crop_and_evaluation_transform_shapes_and_offsets():
    pixels = torch.arange(3 * 40 * 50, dtype=torch.int64).remainder(251).to(torch.uint8).view(3, 40, 50)
    crop = inception_crop(pixels, Box(5, 7, 20, 20), 20)
    assert torch.equal(crop, pixels[:, 5:25, 7:27])  # same size: the resize is the identity
    assert inception_crop(pixels, Box(0, 0, 40, 50), 16).shape == (3, 16, 16)
    evaluated = resize_small_central_crop(pixels, 40, 32)
    assert torch.equal(evaluated, pixels[:, 4:36, 9:41])  # no resize needed; (40 - 32) // 2, (50 - 32) // 2
    assert resize_small_central_crop(pixels, 20, 20).shape == (3, 20, 20)
    assert math.isclose(resize_small_central_crop(torch.full((1, 30, 60), 9, dtype=torch.uint8), 16, 16).float().mean(), 9)


def test_image_decoder_applies_the_inception_crop_in_training_and_resize_small_in_evaluation():
    array = np.random.default_rng(0).integers(0, 256, (90, 120, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    data = buffer.getvalue()
    whole = decode_pixels(data, 3)
    decoder = ImageDecoder(32, 3, 10, crop="inception", scale=(0.8, 1.0), ratio=RATIO, eval_resize_ratio=1.0)
    trained = decoder.pixels(data, random.Random(5))
    expected = inception_crop(whole, inception_crop_box(90, 120, (0.8, 1.0), RATIO, random.Random(5)), 32)
    assert trained.shape == (3, 32, 32) and torch.equal(trained, expected)
    assert torch.equal(decoder.pixels(data), resize_small_central_crop(whole, 32, 32))
