"""Objectives: prediction + corrupted view -> loss (they own target, loss region and weighting)."""

from maskdiff.objectives.base import Objective, ObjectiveOutput, region_mean
from maskdiff.objectives.diffusion import DiffusionLoss, min_snr_weight
from maskdiff.objectives.dual import DualPredictionLoss
from maskdiff.objectives.reconstruction import MaskedReconstruction, normalize_patches

__all__ = ["DiffusionLoss", "DualPredictionLoss", "MaskedReconstruction", "Objective", "ObjectiveOutput", "min_snr_weight",
           "normalize_patches", "region_mean"]
