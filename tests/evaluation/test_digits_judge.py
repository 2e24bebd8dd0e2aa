import numpy as np
import pytest
import torch
import torch.nn.functional as F

from maskdiff.evaluation.digits_judge import load_digits_judge, load_digits_split, score_digits
from maskdiff.evaluation.frechet import feature_statistics, frechet_distance


def reference_frechet(a: np.ndarray, b: np.ndarray) -> float:
    """FID formula via an eigen-decomposition square root (independent of scipy.linalg.sqrtm)."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    values, vectors = np.linalg.eigh(cov_a)
    root_a = vectors @ np.diag(np.sqrt(np.clip(values, 0, None))) @ vectors.T
    middle = np.linalg.eigvalsh(root_a @ cov_b @ root_a)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * np.sqrt(np.clip(middle, 0, None)).sum())


def test_frechet_distance_matches_a_reference_and_is_zero_on_itself():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 8))
    b = rng.normal(loc=0.5, scale=1.5, size=(400, 8)) @ rng.normal(size=(8, 8))
    assert frechet_distance(*feature_statistics(a), *feature_statistics(b)) == pytest.approx(reference_frechet(a, b), rel=1e-6)
    assert abs(frechet_distance(*feature_statistics(a), *feature_statistics(a))) < 1e-8
    with pytest.raises(ValueError, match=r"\(N >= 2, D\)"):
        feature_statistics(np.zeros((1, 3)))


def test_digits_judge_accuracy_and_scores(digits_cache):
    judge, accuracy = load_digits_judge()
    assert accuracy >= 0.97  # stated held-out accuracy on the digits validation split
    again, cached_accuracy = load_digits_judge()  # second call reads the cache
    assert cached_accuracy == accuracy
    train, labels = load_digits_split("train")
    real = score_digits(F.interpolate(train[:300], size=16, mode="bilinear", antialias=True), labels[:300])
    noise = score_digits(torch.rand(300, 1, 16, 16) * 2 - 1, labels[:300])
    assert real.class_consistency > 0.95 and noise.class_consistency < 0.3
    assert real.frechet_distance < 0.2 * noise.frechet_distance
    assert score_digits(load_digits_split("val")[0]).frechet_distance == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="grayscale"):
        judge.features(torch.zeros(2, 3, 8, 8))
