"""A small classifier of the real digits that judges generated digits on a CPU.

Trained once on the digits training split (deterministic: fixed seed, full-batch), cached under
``$MASKDIFF_CACHE/digits_judge.pt``. Its hidden layer gives features for a Fréchet distance ("digits FD"),
its predictions give class consistency (the share of samples assigned to the class they were generated for).
Inputs are images ``(B, 1, H, W)`` in [-1, 1] of any size; they are average-pooled to the native 8×8.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from maskdiff.data.digits import default_cache_dir, split_indices
from maskdiff.evaluation.frechet import feature_statistics, frechet_distance
from maskdiff.files import save_torch

log = logging.getLogger("maskdiff.evaluation")

JUDGE_VERSION = 1


def load_digits_split(split: str, seed: int = 0, val_fraction: float = 1 / 6) -> tuple[torch.Tensor, torch.Tensor]:
    """The digits ``split`` (``train``/``val``, the same split as the shards) as images ``(N, 1, 8, 8)`` in [-1, 1]."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    index = split_indices(len(digits.target), val_fraction, seed)[split]
    images = torch.tensor(digits.images[index], dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0
    return images, torch.tensor(digits.target[index], dtype=torch.long)


class DigitsJudge(nn.Module):
    """MLP 64 → 128 → 10 on 8×8 digits; ``features`` are the 128 hidden activations."""

    def __init__(self, hidden: int = 128) -> None:
        super().__init__()
        self.hidden = nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU())
        self.head = nn.Linear(hidden, 10)

    @staticmethod
    def to_native(images: torch.Tensor) -> torch.Tensor:
        """``(B, 1, H, W)`` in [-1, 1] -> ``(B, 1, 8, 8)`` clamped to [-1, 1]."""
        if images.ndim != 4 or images.shape[1] != 1:
            raise ValueError(f"the digits judge takes grayscale images (B, 1, H, W), got {tuple(images.shape)}")
        images = images.float().clamp(-1, 1)
        return images if images.shape[-1] == 8 else F.adaptive_avg_pool2d(images, 8)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.hidden(self.to_native(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


def train_digits_judge(seed: int = 0, epochs: int = 300) -> tuple[DigitsJudge, float]:
    """Train the judge on the training split (full-batch Adam, fixed seed); returns it and its held-out accuracy."""
    generator = torch.Generator().manual_seed(seed)
    images, labels = load_digits_split("train")
    judge = DigitsJudge()
    for parameter in judge.parameters():
        nn.init.normal_(parameter, std=0.1, generator=generator) if parameter.ndim > 1 else nn.init.zeros_(parameter)
    optimizer = torch.optim.Adam(judge.parameters(), lr=1e-2, weight_decay=1e-4)
    with torch.enable_grad():
        for _ in range(epochs):
            loss = F.cross_entropy(judge(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    val_images, val_labels = load_digits_split("val")
    with torch.no_grad():
        accuracy = (judge(val_images).argmax(-1) == val_labels).float().mean().item()
    return judge.eval(), accuracy


def load_digits_judge(cache_dir: str | Path | None = None) -> tuple[DigitsJudge, float]:
    """The cached judge and its held-out accuracy, training (and caching) it on first use."""
    path = Path(cache_dir or default_cache_dir()) / "digits_judge.pt"
    if path.is_file():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if saved.get("version") == JUDGE_VERSION:
            judge = DigitsJudge()
            judge.load_state_dict(saved["state_dict"])
            return judge.eval(), saved["accuracy"]
    judge, accuracy = train_digits_judge()
    save_torch({"version": JUDGE_VERSION, "state_dict": judge.state_dict(), "accuracy": accuracy}, path)
    log.info("digits judge trained: held-out accuracy %.4f, cached at %s", accuracy, path)
    return judge, accuracy


@dataclass
class DigitsScore:
    """Digits Fréchet distance to the held-out real digits and class consistency of labelled samples."""

    frechet_distance: float
    class_consistency: float | None
    judge_accuracy: float
    num_samples: int


@torch.no_grad()
def score_digits(images: torch.Tensor, labels: torch.Tensor | None = None, cache_dir: str | Path | None = None) -> DigitsScore:
    """Score generated digits ``(B, 1, H, W)`` in [-1, 1] (``labels (B,)`` the classes they were generated for)."""
    judge, accuracy = load_digits_judge(cache_dir)
    reference, _ = load_digits_split("val")
    fd = frechet_distance(*feature_statistics(judge.features(images)), *feature_statistics(judge.features(reference)))
    consistency = None
    if labels is not None:
        consistency = (judge(images).argmax(-1).cpu() == labels.cpu()).float().mean().item()
    return DigitsScore(fd, consistency, accuracy, images.shape[0])
