"""Methods: LightningModules that compose a backbone, a corruption, an objective and a sampler; and fine-tuning."""

from maskdiff.methods.base import MaskDiffModule
from maskdiff.methods.diffmae import DiffMAE
from maskdiff.methods.dit import DiT
from maskdiff.methods.finetune import FineTune
from maskdiff.methods.mae import MAE
from maskdiff.methods.mdt import MDT
from maskdiff.methods.umd import UMD

__all__ = ["MAE", "MDT", "UMD", "DiT", "DiffMAE", "FineTune", "MaskDiffModule"]
