"""Evaluation: Fréchet distances, the digits judge, and representation probes."""

from maskdiff.evaluation.digits_judge import DigitsScore, load_digits_judge, score_digits
from maskdiff.evaluation.features import FeatureSpec, extract_dataset_features, extract_features
from maskdiff.evaluation.frechet import feature_statistics, frechet_distance
from maskdiff.evaluation.lars import LARS
from maskdiff.evaluation.linear_probe import probe, run_linear_probe

__all__ = ["LARS", "DigitsScore", "FeatureSpec", "extract_dataset_features", "extract_features", "feature_statistics",
           "frechet_distance", "load_digits_judge", "probe", "run_linear_probe", "score_digits"]
