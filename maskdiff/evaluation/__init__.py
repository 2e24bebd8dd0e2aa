"""Evaluation: Fréchet distances, the digits judge, and representation probes."""

from maskdiff.evaluation.digits_judge import DigitsScore, load_digits_judge, score_digits
from maskdiff.evaluation.frechet import feature_statistics, frechet_distance

__all__ = ["DigitsScore", "feature_statistics", "frechet_distance", "load_digits_judge", "score_digits"]
