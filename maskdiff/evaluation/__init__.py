"""Evaluation: Fréchet distances, the digits judge, and representation probes."""

from maskdiff.evaluation.digits_judge import DigitsScore, load_digits_judge, score_digits
from maskdiff.evaluation.evaluate import balanced_labels, generate_samples
from maskdiff.evaluation.scoring import score_samples
from maskdiff.backbones.features import FeatureSpec
from maskdiff.evaluation.features import extract_dataset_features, extract_features
from maskdiff.evaluation.frechet import feature_statistics, frechet_distance
from maskdiff.evaluation.inception import (
    DigitsJudgeFeatures,
    build_fid,
    build_inception_score,
    resolve_inception_weights,
)
from maskdiff.evaluation.lars import LARS
from maskdiff.evaluation.linear_probe import run_linear_probe

__all__ = ["LARS", "DigitsJudgeFeatures", "DigitsScore", "FeatureSpec", "balanced_labels", "build_fid",
           "build_inception_score", "extract_dataset_features", "extract_features", "feature_statistics",
           "frechet_distance", "generate_samples", "load_digits_judge", "resolve_inception_weights",
           "run_linear_probe", "score_digits", "score_samples"]
