"""The few-shot probe is big_vision's ``fewshot_lsr``, checked against the formula written out here in numpy."""

import logging

import numpy as np
import pytest
import torch

from maskdiff.evaluation.few_shot import few_shot_indices, few_shot_probe, fewshot_lsr_predict

CLASSES, DIM = 10, 32


def uneven_features(num: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Class-separable features whose dimensions span five orders of magnitude (scales 1e-3 .. 1e2)."""
    centres = np.random.default_rng(1).normal(size=(CLASSES, DIM))
    labels = rng.integers(0, CLASSES, num)
    features = (2 * centres[labels] + rng.normal(size=(num, DIM))) * 10.0 ** np.linspace(-3, 2, DIM)
    return torch.tensor(features, dtype=torch.float32), torch.tensor(labels)


def official_predictions(x: np.ndarray, y: np.ndarray, x_test: np.ndarray, l2_reg: float) -> np.ndarray:
    """big_vision's formula, solved directly: per-dimension standardisation (+1e-5), a bias column of 100, ±1 one-hot
    targets, ridge (XᵀX + l2 I)⁻¹XᵀY when N ≥ D, else Xᵀ(XXᵀ + l2 I)⁻¹Y."""
    mean, std = x.mean(0, keepdims=True), x.std(0, keepdims=True) + 1e-5
    pad = lambda z: np.pad((z - mean) / std, ((0, 0), (0, 1)), constant_values=100.0)  # noqa: E731
    x = pad(x)
    targets = 2.0 * np.eye(CLASSES)[y] - 1.0
    n, d = x.shape
    if n >= d:
        weights = np.linalg.solve(x.T @ x + l2_reg * np.eye(d), x.T @ targets)
    else:
        weights = x.T @ np.linalg.solve(x @ x.T + l2_reg * np.eye(n), targets)
    return (pad(x_test) @ weights).argmax(1)


def old_maskdiff_accuracy(x: np.ndarray, y: np.ndarray, x_test: np.ndarray, y_test: np.ndarray, l2_reg: float) -> float:
    """The probe maskdiff had before: one scalar (mean row norm) scales every feature, no bias column."""
    mean = x.mean(0, keepdims=True)
    scale = np.linalg.norm(x - mean, axis=1).mean()
    xs = (x - mean) / scale
    weights = np.linalg.solve(xs.T @ xs + l2_reg * np.eye(x.shape[1]), xs.T @ (2.0 * np.eye(CLASSES)[y] - 1.0))
    return float(((((x_test - mean) / scale) @ weights).argmax(1) == y_test).mean())


@pytest.mark.parametrize("shots", [10, 2], ids=["primal_N_ge_D", "dual_N_lt_D"])
def test_few_shot_probe_is_big_vision_fewshot_lsr_on_uneven_features(shots):
    rng = np.random.default_rng(0)
    train, val = uneven_features(3000, rng), uneven_features(2000, rng)
    index = few_shot_indices(train[1], shots, seed=0, num_classes=CLASSES)
    bv_rng = np.random.default_rng(0)
    expected_index = np.concatenate([bv_rng.permutation(np.where(train[1].numpy() == c)[0])[:shots] for c in range(CLASSES)])
    np.testing.assert_array_equal(index.numpy(), expected_index)

    x, y = train[0][index].double().numpy(), train[1][index].numpy()
    reference = official_predictions(x, y, val[0].double().numpy(), 1024.0)
    ours = fewshot_lsr_predict(train[0][index], train[1][index], val[0], CLASSES, 1024.0)
    np.testing.assert_array_equal(ours.numpy(), reference)

    accuracy = few_shot_probe(*train, *val, shots=shots)
    official = float((reference == val[1].numpy()).mean())
    old = old_maskdiff_accuracy(x, y, val[0].double().numpy(), val[1].numpy(), 1024.0)
    print(f"\n{shots}-shot, l2 1024, uneven scales: maskdiff {accuracy:.4f}, official formula {official:.4f}, "
          f"old maskdiff formula {old:.4f}")
    assert accuracy == official >= 0.99 and old < 0.6


def test_classes_short_of_shots_use_what_they_have(caplog):
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
    features = torch.randn(9, 4, generator=torch.Generator().manual_seed(0))
    with caplog.at_level(logging.WARNING, logger="maskdiff.evaluation"):
        index = few_shot_indices(labels, shots=3, seed=0, num_classes=4)
    assert sorted(labels[index].tolist()) == [0, 0, 0, 1, 1, 2, 2, 2]
    assert "2 of 4 classes have fewer than 3 training examples" in caplog.text
    assert 0.0 <= few_shot_probe(features, labels, features, labels, shots=3, num_classes=4) <= 1.0
    with pytest.raises(ValueError, match="shots must be >= 1"):
        few_shot_probe(features, labels, features, labels, shots=0)
