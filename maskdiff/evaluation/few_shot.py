"""Few-shot probe, UMD's protocol: big_vision's ``fewshot_lsr`` evaluator (closed-form least-squares regression).

For ``shots`` training examples per class (drawn as big_vision draws them: ``numpy.random.default_rng(seed)``
permutes the indices of each class 0..C-1 in turn and keeps the first ``shots``):

1. standardise each feature dimension with the shots' mean and (population) std + 1e-5;
2. append a constant bias feature of :data:`BIAS_CONSTANT` (100: large, so the bias is almost unregularised);
3. regress one-hot targets in {-1, 1} with ridge penalty ``l2_reg`` (UMD: 1024), through the eigendecomposition of
   XᵀX (N ≥ D+1: ``w = Q (Λ + l2 I)⁻¹ Qᵀ Xᵀ Y``) or of XXᵀ (N < D+1: ``w = Xᵀ Q (Λ + l2 I)⁻¹ Qᵀ Y``);
4. predict the argmax of the held-out features (standardised and padded the same way).

Differences from big_vision: float64 instead of float32 (the bias column puts eigenvalues of ~N·10⁴ next to ones of
~1), and a warning (not silence) when a class has fewer than ``shots`` examples; like big_vision it then uses all it has.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger("maskdiff.evaluation")

BIAS_CONSTANT = 100.0
STD_EPS = 1e-5
TEST_CHUNK = 16384


def few_shot_indices(labels: torch.Tensor, shots: int, seed: int, num_classes: int) -> torch.Tensor:
    """Rows of ``labels (M,)`` used as shots: for each class 0..C-1 in turn, the first ``shots`` of a
    ``numpy.random.default_rng(seed)`` permutation of its rows (big_vision's choice), concatenated ``(≤ C·shots,)``."""
    rng = np.random.default_rng(seed)
    labels_np = labels.cpu().numpy()
    chosen = [rng.permutation(np.where(labels_np == label)[0])[:shots] for label in range(num_classes)]
    short = sum(len(rows) < shots for rows in chosen)
    if short:
        log.warning("few-shot probe: %d of %d classes have fewer than %d training examples; using all they have",
                    short, num_classes, shots)
    return torch.from_numpy(np.concatenate(chosen).astype(np.int64))


def _standardise(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """``(M, D)`` -> ``(M, D + 1)``: standardised, with the constant bias column appended."""
    return F.pad((x.double() - mean) / std, (0, 1), value=BIAS_CONSTANT)


def fewshot_lsr_predict(
    train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor, num_classes: int, l2_reg: float
) -> torch.Tensor:
    """big_vision's ``_precompute_cache`` + ``_eig_fewshot_acc_fn`` on ``(N, D)`` shots with labels ``(N,)``:
    predicted classes ``(M,)`` of ``test_features (M, D)``."""
    x = train_features.double()
    mean = x.mean(dim=0, keepdim=True)
    std = x.std(dim=0, unbiased=False, keepdim=True) + STD_EPS
    x = _standardise(x, mean, std)
    targets = 2.0 * F.one_hot(train_labels.long(), num_classes).double() - 1.0
    num_points, dim = x.shape
    if num_points >= dim:
        eigs, q = torch.linalg.eigh(x.T @ x)
        rhs, lhs = q.T @ (x.T @ targets), q
    else:
        eigs, q = torch.linalg.eigh(x @ x.T)
        rhs, lhs = q.T @ targets, x.T @ q
    weights = (lhs / (eigs + l2_reg).unsqueeze(0)) @ rhs
    return torch.cat([(_standardise(chunk, mean, std) @ weights).argmax(dim=1) for chunk in test_features.split(TEST_CHUNK)])


def few_shot_probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    val_features: torch.Tensor,
    val_labels: torch.Tensor,
    shots: int,
    l2_reg: float = 1024.0,
    seed: int = 0,
    num_classes: int | None = None,
) -> float:
    """Top-1 accuracy of UMD's few-shot probe (big_vision ``fewshot_lsr``, see the module notes).

    Args:
        train_features, train_labels: ``(M, D)`` features and ``(M,)`` class indices the shots are drawn from.
        val_features, val_labels: ``(M_val, D)`` and ``(M_val,)``.
        shots: examples per class (UMD: 100, from ImageNet ``train[:100000]``).
        l2_reg: ridge penalty (UMD: 1024).
        seed: seeds the choice of shots (big_vision reports seed 0).
        num_classes: C (default: the largest label + 1).
    """
    if shots < 1:
        raise ValueError(f"shots must be >= 1, got {shots}")
    if train_features.ndim != 2 or val_features.ndim != 2 or train_features.shape[1] != val_features.shape[1]:
        raise ValueError(f"expected features (M, D) with the same D, got {tuple(train_features.shape)} and {tuple(val_features.shape)}")
    if int(train_labels.min()) < 0 or int(val_labels.min()) < 0:
        raise ValueError("few-shot probe labels must be class indices >= 0")
    num_classes = num_classes or int(max(train_labels.max(), val_labels.max())) + 1
    index = few_shot_indices(train_labels, shots, seed, num_classes)
    predictions = fewshot_lsr_predict(train_features[index], train_labels[index], val_features, num_classes, l2_reg)
    return float((predictions == val_labels.to(predictions.device)).double().mean())
