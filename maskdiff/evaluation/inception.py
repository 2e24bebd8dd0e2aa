"""Inception-v3 FID/IS from a local weights file (never downloaded), and small FID feature extractors.

The weights are torch-fidelity's port of the 2015-12-05 TensorFlow Inception (the network of the TTUR/ADM
evaluators). They are looked up, in order, at the path given as an argument, at ``$MASKDIFF_INCEPTION_WEIGHTS``,
and at torch-fidelity's own cache file ``$TORCH_HOME/hub/checkpoints/weights-inception-2015-12-05-6726825d.pth``;
when none exists a :class:`FileNotFoundError` says where to put the file and where to fetch it.

Every feature extractor here takes ``uint8`` images ``(B, 3, H, W)`` (see :func:`to_inception_uint8`) and returns
features ``(B, D)``; Inception resizes them to 299×299 with torch-fidelity's TF1-compatible bilinear resize
(``antialias=False``), as torch-fidelity and the ADM evaluator do.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from torch import nn

from maskdiff.evaluation.digits_judge import load_digits_judge

INCEPTION_WEIGHTS_NAME = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_WEIGHTS_NAME}"
INCEPTION_WEIGHTS_ENV = "MASKDIFF_INCEPTION_WEIGHTS"
INCEPTION_EXTRACTOR = "inception-v3-compat"


def default_inception_weights_path() -> Path:
    """torch-fidelity's cache file: ``$TORCH_HOME/hub/checkpoints/weights-inception-2015-12-05-6726825d.pth``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_NAME


def resolve_inception_weights(path: str | Path | None = None) -> Path:
    """The Inception weights file: ``path``, else ``$MASKDIFF_INCEPTION_WEIGHTS``, else torch-fidelity's cache file.

    Raises:
        FileNotFoundError: the chosen file does not exist; the message names the places looked at, the file's
            exact name and the URL to fetch it from on a machine with internet.
    """
    if path is not None:
        candidate, source = Path(path).expanduser(), "the weights_path argument"
    elif os.environ.get(INCEPTION_WEIGHTS_ENV):
        candidate, source = Path(os.environ[INCEPTION_WEIGHTS_ENV]).expanduser(), f"${INCEPTION_WEIGHTS_ENV}"
    else:
        candidate, source = default_inception_weights_path(), "torch-fidelity's cache ($TORCH_HOME/hub/checkpoints)"
    if candidate.is_file():
        return candidate
    raise FileNotFoundError(
        f"Inception weights not found at {candidate} (from {source}). maskdiff never downloads them: on a machine "
        f"with internet fetch {INCEPTION_WEIGHTS_URL} (file name {INCEPTION_WEIGHTS_NAME}, about 92 MB) and either "
        f"put it at {default_inception_weights_path()} or point ${INCEPTION_WEIGHTS_ENV} (or weights_path) at it"
    )


_SHA256_CACHE: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file (remembered per path, size and modification time)."""
    path = Path(path)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _SHA256_CACHE:
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        _SHA256_CACHE[key] = digest.hexdigest()
    return _SHA256_CACHE[key]


def to_inception_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images ``(B, C, H, W)`` in [-1, 1] -> ``uint8 (B, 3, H, W)``; grayscale is repeated to 3 channels.

    Uses DiT's ``sample_ddp.py`` conversion ``clamp(127.5·x + 128, 0, 255)`` truncated to uint8, which inverts the
    data loaders' ``p / 127.5 - 1`` exactly.
    """
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images (B, 1 or 3, H, W) in [-1, 1], got shape {tuple(images.shape)}")
    pixels = (127.5 * images.float() + 128.0).clamp(0, 255).to(torch.uint8)
    return pixels.expand(-1, 3, -1, -1).contiguous() if pixels.shape[1] == 1 else pixels


def inception_network(features: str, weights_path: str | Path | None = None) -> nn.Module:
    """torchmetrics' ``NoTrainInceptionV3`` with output ``features`` (``"2048"``, ``"logits_unbiased"``, ...)."""
    from torchmetrics.image.fid import NoTrainInceptionV3

    return NoTrainInceptionV3(
        name=INCEPTION_EXTRACTOR,
        features_list=[features],
        feature_extractor_weights_path=str(resolve_inception_weights(weights_path)),
        antialias=False,
    )


def build_fid(feature: int | nn.Module = 2048, weights_path: str | Path | None = None):
    """torchmetrics ``FrechetInceptionDistance`` that keeps its real statistics across ``reset()`` (float64 states).

    Args:
        feature: an Inception pool size (64, 192, 768, 2048; needs the weights file) or any module mapping
            ``uint8 (B, 3, H, W)`` to ``(B, D)`` (e.g. :class:`DigitsJudgeFeatures`).
        weights_path: Inception weights (see :func:`resolve_inception_weights`).
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    if isinstance(feature, nn.Module):
        return FrechetInceptionDistance(feature=feature, reset_real_features=False)
    if feature not in (64, 192, 768, 2048):
        raise ValueError(f"feature must be an Inception pool size 64, 192, 768 or 2048, or an nn.Module; got {feature!r}")
    return FrechetInceptionDistance(
        feature=feature,
        feature_extractor_weights_path=str(resolve_inception_weights(weights_path)),
        antialias=False,
        reset_real_features=False,
    )


def build_inception_score(feature: nn.Module | None = None, weights_path: str | Path | None = None, splits: int = 10):
    """torchmetrics ``InceptionScore`` over Inception's ``logits_unbiased`` (or over ``feature``'s logits ``(B, K)``)."""
    from torchmetrics.image.inception import InceptionScore

    network = feature if feature is not None else inception_network("logits_unbiased", weights_path)
    return InceptionScore(feature=network, splits=splits)


class DigitsJudgeFeatures(nn.Module):
    """The digits judge as a feature extractor: ``uint8 (B, 3 or 1, H, W)`` -> hidden features ``(B, 128)``.

    With ``logits=True`` it returns the judge's class logits ``(B, 10)`` instead (an Inception-Score-like
    "digits IS"). The judge is loaded (trained and cached on first use) from ``cache_dir``.
    """

    def __init__(self, logits: bool = False, cache_dir: str | None = None) -> None:
        super().__init__()
        self.judge, _ = load_digits_judge(cache_dir)
        self.judge.requires_grad_(False).eval()
        self.logits = logits
        self.num_features = 10 if logits else self.judge.head.in_features

    def train(self, mode: bool = True) -> DigitsJudgeFeatures:
        return super().train(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"expected uint8 images (B, C, H, W), got {images.dtype} {tuple(images.shape)}")
        gray = images.float().mean(dim=1, keepdim=True) / 127.5 - 1.0
        return self.judge(gray) if self.logits else self.judge.features(gray)
