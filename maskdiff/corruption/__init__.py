"""Corruptions: how clean tokens become what a backbone sees (masks and/or noise)."""

from maskdiff.corruption.base import Corrupted, Corruption
from maskdiff.corruption.maskers import BlockMasker, Masker, RandomMasker, TubeMasker
from maskdiff.corruption.masking import Masking, random_masking, tube_masking
from maskdiff.corruption.noising import GaussianNoise, MaskedNoise, MaskedPatchNoise, TokenMasking, UnifiedMaskedNoise

__all__ = ["BlockMasker", "Corrupted", "Corruption", "GaussianNoise", "MaskedNoise", "MaskedPatchNoise", "Masker", "Masking",
           "RandomMasker", "TokenMasking", "TubeMasker", "UnifiedMaskedNoise", "random_masking", "tube_masking"]
