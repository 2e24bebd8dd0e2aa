"""Scaling maskdiff methods: FSDP sharding of the backbone's blocks, ``torch.compile`` of the backbone, TF32."""

from maskdiff.scale.compile import compile_blocks, compile_in_place, is_compiled
from maskdiff.scale.fsdp import BackboneFSDPStrategy, ShardedNormClipping, block_classes, wrap_classes
from maskdiff.scale.precision import Float32MatmulPrecision

__all__ = ["BackboneFSDPStrategy", "Float32MatmulPrecision", "ShardedNormClipping", "block_classes", "compile_blocks", "compile_in_place", "is_compiled", "wrap_classes"]
