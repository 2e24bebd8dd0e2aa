"""Import sail-sg/MDT checkpoints (MDTv1 ``blocks``/``sideblocks`` and MDTv2 ``en_inblocks``/``en_outblocks``/
``de_blocks``/``sideblocks`` layouts) into maskdiff's :class:`~maskdiff.backbones.MDT` / ``MDTv2``.

Layout changes are DiT's (patch embedding as a Linear over tokens, ``[ε ‖ variance]`` output rows); the
relative-position index buffers are recomputed (and checked), everything else keeps its name.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping

import torch

from maskdiff.backbones.mdt import MDT, MDTv2, relative_position_index
from maskdiff.convert.dit import unwrap_state_dict
from maskdiff.convert.layout import check_keys_and_shapes, dit_family_state_dict, meta_shapes

OFFICIAL_MDT_URL = "https://github.com/sail-sg/MDT"


def _not_an_mdt(reason: str) -> ValueError:
    return ValueError(f"{reason}; expected a sail-sg/MDT state dict ({OFFICIAL_MDT_URL}, models.py MDT or MDTv2)")


def _count(state_dict: Mapping[str, torch.Tensor], prefix: str) -> int:
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
    return len({match.group(1) for key in state_dict if (match := pattern.match(key))})


def infer_mdt_config(state_dict: Mapping[str, torch.Tensor], decode_layer: int | None = None) -> tuple[type, dict]:
    """``(MDT or MDTv2, init args)`` from tensor shapes; heads come from the relative-position tables.

    MDTv1's ``decode_layer`` is not visible in the weights: 2 (every release) unless given.
    """
    for key in ("x_embedder.proj.weight", "pos_embed", "final_layer.linear.weight", "sideblocks.0.attn.qkv.weight"):
        if key not in state_dict:
            raise _not_an_mdt(f"missing key {key}")
    version2 = any(key.startswith("en_inblocks.") for key in state_dict)
    first_block = "en_inblocks.0" if version2 else "blocks.0"
    if f"{first_block}.attn.rel_pos_bias.relative_position_bias_table" not in state_dict:
        raise _not_an_mdt(f"missing key {first_block}.attn.rel_pos_bias.relative_position_bias_table")
    hidden, channels, patch, _ = state_dict["x_embedder.proj.weight"].shape
    tokens = state_dict["pos_embed"].shape[1]
    side = math.isqrt(tokens)
    out_features = state_dict["final_layer.linear.weight"].shape[0]
    table = state_dict["y_embedder.embedding_table.weight"] if "y_embedder.embedding_table.weight" in state_dict else None
    config = {
        "input_size": side * patch,
        "patch_size": patch,
        "in_channels": channels,
        "hidden_size": hidden,
        "num_heads": state_dict[f"{first_block}.attn.rel_pos_bias.relative_position_bias_table"].shape[1],
        "mlp_ratio": state_dict[f"{first_block}.mlp.fc1.weight"].shape[0] / hidden,
        "learn_sigma": out_features == patch * patch * channels * 2,
        "num_classes": table.shape[0] - 1 if table is not None else 0,
        "class_dropout_prob": 0.1 if table is not None else 0.0,
    }
    if version2:
        layers = _count(state_dict, "de_blocks")
        config["decode_layer"] = layers
        config["depth"] = _count(state_dict, "en_inblocks") + _count(state_dict, "en_outblocks") + layers
        return MDTv2, config
    config["depth"] = _count(state_dict, "blocks")
    config["decode_layer"] = 2 if decode_layer is None else decode_layer
    return MDT, config


def convert_mdt_state_dict(official: Mapping[str, torch.Tensor], decode_layer: int | None = None) -> tuple[dict[str, torch.Tensor], type, dict]:
    """Official MDT/MDTv2 weights -> ``(maskdiff state dict, backbone class, init args)``.

    Accepts a bare state dict or a training checkpoint with ``ema``/``model`` entries (EMA preferred).
    """
    source = unwrap_state_dict(official)
    cls, config = infer_mdt_config(source, decode_layer)
    patch, channels = config["patch_size"], config["in_channels"]
    parts = 2 if config["learn_sigma"] else 1
    side = config["input_size"] // patch
    expected_index = relative_position_index(side)
    for key, value in source.items():
        if key.endswith("rel_pos_bias.relative_position_index") and not torch.equal(value.long(), expected_index):
            raise _not_an_mdt(f"{key} is not BEiT's relative position index for a {side}x{side} grid")
    converted = dit_family_state_dict(
        source, patch, channels, parts, skip=lambda key: key.endswith("rel_pos_bias.relative_position_index")
    )
    check_keys_and_shapes(converted, meta_shapes(lambda: cls(**config)), _not_an_mdt)
    return converted, cls, config


def load_official_mdt(path: str | os.PathLike, decode_layer: int | None = None):
    """Build a maskdiff MDT / MDTv2 backbone from an official checkpoint file (eval mode, on the CPU)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"MDT checkpoint not found: {os.fspath(path)!r}")
    state_dict, cls, config = convert_mdt_state_dict(torch.load(path, map_location="cpu", weights_only=True), decode_layer)
    model = cls(**config)
    model.load_state_dict(state_dict, strict=True)
    return model.eval()
