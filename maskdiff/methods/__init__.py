"""Methods: LightningModules that compose a backbone, a corruption, an objective and a sampler."""

from maskdiff.methods.base import MaskDiffModule
from maskdiff.methods.dit import DiT

__all__ = ["DiT", "MaskDiffModule"]
