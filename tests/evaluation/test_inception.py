"""Inception FID/IS from a local weights file: lookup, the no-download error, and parity with torch-fidelity.

The real weights (92 MB) cannot be downloaded here, so the tests write torch-fidelity's ``FeatureExtractorInceptionV3``
with seeded random weights in the exact layout torch-fidelity loads (its ``state_dict``). With PyTorch's default
initialisation the 2048-d pool features of every image collapse to ~0 (FID ≈ 0 for any two sets, which would make
the parity test vacuous), so every conv/linear filter is drawn zero-mean (the DC offset that post-ReLU activations
carry from layer to layer is what makes deep random ReLU nets map all images alike) and unit-norm with a gain that
keeps activations O(0.01–0.1) through the 94 convolutions.
"""

from __future__ import annotations

import urllib.request
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from maskdiff.evaluation.inception import (
    INCEPTION_WEIGHTS_ENV,
    INCEPTION_WEIGHTS_NAME,
    INCEPTION_WEIGHTS_URL,
    DigitsJudgeFeatures,
    build_fid,
    build_inception_score,
    resolve_inception_weights,
    to_inception_uint8,
)

CONV_GAIN = 1.75
LOGIT_GAIN = 100.0


def write_small_inception_weights(path: Path, seed: int = 0) -> Path:
    """Save a seeded random ``FeatureExtractorInceptionV3`` state dict at ``path`` (once; reused if present)."""
    if path.is_file():
        return path
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class FreshInception(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):
            return None  # keep the fresh parameters; torch-fidelity's constructor always loads a file

    path.parent.mkdir(parents=True, exist_ok=True)
    empty = path.with_name("empty-state.pth")
    torch.save({}, empty)
    network = FreshInception("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(empty))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in network.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                weight = torch.randn(module.weight.shape, generator=generator)
                weight -= weight.flatten(1).mean(1).view(-1, *[1] * (weight.ndim - 1))
                weight /= weight.flatten(1).norm(dim=1).view(-1, *[1] * (weight.ndim - 1))
                module.weight.copy_(weight * (CONV_GAIN if isinstance(module, nn.Conv2d) else LOGIT_GAIN))
    temporary = path.with_name(path.name + ".tmp")
    torch.save(network.state_dict(), temporary)
    temporary.replace(path)
    return path


class TensorImages(torch.utils.data.Dataset):
    """uint8 images ``(N, 3, H, W)`` as a Dataset of ``(3, H, W)`` tensors (torch-fidelity's input)."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.images[index]


@pytest.fixture(scope="session")
def small_inception_weights(tmp_path_factory) -> Path:
    return write_small_inception_weights(tmp_path_factory.getbasetemp() / "small-inception" / INCEPTION_WEIGHTS_NAME)


def digit_images(start: int, count: int, size: int = 16) -> torch.Tensor:
    """Real held-out digits ``(count, 1, size, size)`` in [-1, 1]."""
    from maskdiff.evaluation.digits_judge import load_digits_split

    images, _ = load_digits_split("val")
    return F.interpolate(images[start : start + count], size=size, mode="bilinear", align_corners=False).clamp(-1, 1)


@pytest.fixture
def no_network(monkeypatch):
    """Fail the test if anything tries to download (torch.hub or urllib)."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"attempted a download: {args[:1]}")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(urllib.request, "urlopen", refuse)


def test_missing_weights_error_says_where_to_put_the_file(tmp_path, monkeypatch, no_network):
    monkeypatch.delenv(INCEPTION_WEIGHTS_ENV, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    expected_place = tmp_path / "torch-home" / "hub" / "checkpoints" / INCEPTION_WEIGHTS_NAME
    for build in (resolve_inception_weights, build_fid, lambda: build_inception_score()):
        with pytest.raises(FileNotFoundError) as error:
            build()
        message = str(error.value)
        assert INCEPTION_WEIGHTS_URL in message and INCEPTION_WEIGHTS_NAME in message
        assert str(expected_place) in message and INCEPTION_WEIGHTS_ENV in message
    with pytest.raises(FileNotFoundError, match="nowhere/weights.pth"):
        build_fid(2048, weights_path=tmp_path / "nowhere" / "weights.pth")


def test_weights_are_looked_up_argument_then_environment_then_torch_home(tmp_path, monkeypatch):
    home_file = tmp_path / "torch-home" / "hub" / "checkpoints" / INCEPTION_WEIGHTS_NAME
    env_file, arg_file = tmp_path / "env.pth", tmp_path / "arg.pth"
    for path in (home_file, env_file, arg_file):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.delenv(INCEPTION_WEIGHTS_ENV, raising=False)
    assert resolve_inception_weights() == home_file
    monkeypatch.setenv(INCEPTION_WEIGHTS_ENV, str(env_file))
    assert resolve_inception_weights() == env_file
    assert resolve_inception_weights(arg_file) == arg_file


def test_uint8_conversion_inverts_the_data_scaling_and_repeats_grayscale():
    pixels = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16)
    converted = to_inception_uint8(pixels.float() / 127.5 - 1.0)
    assert converted.dtype == torch.uint8 and converted.shape == (1, 3, 16, 16)
    assert torch.equal(converted, pixels.expand(1, 3, 16, 16))
    assert to_inception_uint8(torch.tensor([-3.0, 3.0]).view(1, 1, 1, 2)).flatten().tolist() == [0, 255] * 3
    with pytest.raises(ValueError, match=r"\(2, 2, 4, 4\)"):
        to_inception_uint8(torch.zeros(2, 2, 4, 4))


@pytest.mark.parametrize("feature", [64, pytest.param(2048, marks=pytest.mark.slow)])
def test_torchmetrics_fid_and_is_match_torch_fidelity(feature, small_inception_weights, no_network, one_thread):
    """Same weights file, same images: torchmetrics (antialias=False) and torch-fidelity agree.

    The 2048-d case is slow only for its two 2048×2048 eigen-decompositions on a shared CPU.
    """
    from torch_fidelity import calculate_metrics

    real, fake = to_inception_uint8(digit_images(0, 6)), to_inception_uint8(digit_images(100, 6).flip(-1))
    fid = build_fid(feature, small_inception_weights)
    assert fid.real_features_sum.dtype == torch.float64 and fid.reset_real_features is False
    fid.update(real, real=True)
    fid.update(fake, real=False)
    inception_score = build_inception_score(weights_path=small_inception_weights, splits=1)
    inception_score.update(fake)
    ours_fid, ours_is = float(fid.compute()), float(inception_score.compute()[0])

    theirs = calculate_metrics(
        input1=TensorImages(fake), input2=TensorImages(real), fid=True, isc=True, isc_splits=1,
        feature_extractor="inception-v3-compat", feature_layer_fid=str(feature),
        feature_extractor_weights_path=str(small_inception_weights), cuda=False, batch_size=6, save_cpu_ram=True,
        cache=False, verbose=False,
    )
    assert ours_fid > 1e-4 and ours_is > 1.05  # the small network's features are informative, not collapsed
    assert ours_fid == pytest.approx(theirs["frechet_inception_distance"], rel=1e-5)
    assert ours_is == pytest.approx(theirs["inception_score_mean"], rel=1e-5)

    fid.reset()  # keeps the real statistics
    fid.update(real, real=False)
    assert abs(float(fid.compute())) < 1e-4 * ours_fid


def test_digits_judge_adapter_reads_inception_uint8_images(digits_cache):
    from maskdiff.evaluation.digits_judge import load_digits_split

    images, labels = load_digits_split("val")
    features, logits = DigitsJudgeFeatures(), DigitsJudgeFeatures(logits=True)
    pixels = to_inception_uint8(F.interpolate(images, size=16, mode="bilinear", align_corners=False))
    assert features(pixels).shape == (len(images), features.num_features) == (300, 128)
    accuracy = (logits(pixels).argmax(-1) == labels).float().mean().item()
    assert accuracy > 0.85
    assert not features.train().training
    fid = build_fid(features)
    fid.update(pixels[:150], real=True)
    fid.update(pixels[150:], real=False)
    same_digits = float(fid.compute())
    fid.reset()
    fid.update(torch.full_like(pixels[:150], 255), real=False)
    assert float(fid.compute()) > 10 * same_digits
    with pytest.raises(ValueError, match="uint8"):
        features(images)
