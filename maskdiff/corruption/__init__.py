"""Corruptions: how clean tokens become what a backbone sees (masks and/or noise)."""

from maskdiff.corruption.base import Corrupted, Corruption
from maskdiff.corruption.masking import Masking, random_masking, tube_masking
from maskdiff.corruption.noising import GaussianNoise, MaskedNoise, MaskedPatchNoise, TokenMasking, UnifiedMaskedNoise

__all__ = ["Corrupted", "Corruption", "GaussianNoise", "MaskedNoise", "MaskedPatchNoise", "Masking", "TokenMasking", "UnifiedMaskedNoise", "random_masking", "tube_masking"]
