"""Layer-wise learning-rate decay and stochastic depth for fine-tuning an encoder (MAE's ``param_groups_lrd`` layout).

Parameters are numbered as MAE numbers them: embeddings and tokens (top-level names containing ``embed`` or
``token``) are layer 0, encoder block ``i`` (``blocks.i``; MDTv2 ``en_inblocks.i`` then ``en_outblocks.i``) is layer
``i + 1``, everything else (final norm, ``fc_norm``, head, decoder blocks) is the last layer.
"""

from __future__ import annotations

import math
import re

from timm.layers import DropPath
from timm.models.vision_transformer import Block
from torch import nn

from maskdiff.backbones.base import Backbone

BLOCK_NAME = re.compile(r"^(blocks|en_inblocks|en_outblocks)\.(\d+)\.")
LAST_LAYER = math.inf
# timm ViT's ``no_weight_decay`` (MAE's main_finetune passes it to param_groups_lrd): no decay on cls/pos tokens.
FINETUNE_NO_DECAY = frozenset({"cls_token", "pos_embed", "dist_token"})



def encoder_layer(backbone: Backbone, name: str) -> float:
    """Layer id of the backbone parameter ``name``: 0 for embeddings/tokens, ``i + 1`` for encoder block ``i``,
    ``inf`` (the last layer) for everything else, decoder blocks included."""
    match = BLOCK_NAME.match(name)
    if match:
        kind, index = match.group(1), int(match.group(2))
        if kind == "en_outblocks":
            index += len(backbone.en_inblocks)
        return index + 1 if index < backbone.num_blocks else LAST_LAYER
    top = name.split(".", 1)[0]
    return 0 if ("embed" in top or "token" in top) else LAST_LAYER


def set_drop_path(backbone: Backbone, rate: float) -> None:
    """Stochastic depth rising linearly from 0 to ``rate`` over the encoder blocks (timm ``Block``'s ``drop_path1/2``).

    Raises ValueError when ``rate > 0`` and the encoder blocks have no drop path (e.g. DiT's adaLN blocks).
    """
    blocks = backbone.encoder_blocks
    supported = bool(blocks) and all(isinstance(b, Block) for b in blocks)
    if not supported:
        if rate > 0:
            kind = type(blocks[0]).__name__ if blocks else "no `blocks`"
            raise ValueError(
                f"drop_path_rate {rate} needs encoder blocks with drop paths (timm ViT Block, as in MAE), but "
                f"{type(backbone).__name__} has {kind}; use drop_path_rate 0"
            )
        return
    for index, block in enumerate(blocks):
        block_rate = rate * index / (len(blocks) - 1) if len(blocks) > 1 else 0.0
        block.drop_path1 = DropPath(block_rate) if block_rate > 0 else nn.Identity()
        block.drop_path2 = DropPath(block_rate) if block_rate > 0 else nn.Identity()
