"""Backbones: token-to-token networks behind one contract (:class:`Backbone`), sizes in a registry."""

from maskdiff.backbones.base import Backbone
from maskdiff.backbones.diffmae import DiffMAE
from maskdiff.backbones.dit import DiT, DiTBlock
from maskdiff.backbones.mae import MAE
from maskdiff.backbones.mdt import MDT, MDTBlock, MDTv2
from maskdiff.backbones.patching import Patchifier
from maskdiff.backbones.registry import create_backbone, list_backbones, register_backbone
from maskdiff.backbones.umd import UMD

__all__ = ["Backbone", "DiT", "DiffMAE", "DiTBlock", "MAE", "MDT", "MDTBlock", "MDTv2", "Patchifier", "UMD", "create_backbone", "list_backbones", "register_backbone"]
