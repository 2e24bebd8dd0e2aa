"""Import facebookresearch/mae checkpoints (``models_mae.py`` state dicts) into maskdiff's :class:`MAE` backbone.

The two models compute the same function; only the layout of three tensors changes:

* ``patch_embed.proj.weight`` ``(D, C, p, p)`` Conv2d -> ``patch_embed.weight`` ``(D, p*p*C)`` Linear over patch
  tokens in (p_row, p_col, channel) order (``patch_embed.proj.bias`` -> ``patch_embed.bias``);
* ``pos_embed`` and ``decoder_pos_embed`` (frozen parameters there, computed buffers here) are checked and dropped.

Two kinds of release exist: ``mae_pretrain_vit_*.pth`` hold the **encoder only** (the decoder is left freshly
initialised), ``mae_visualize_vit_*.pth`` hold encoder and decoder (everything loads strictly). Official models read
ImageNet-normalised pixels; :func:`fold_pixel_normalization` rewrites them for maskdiff's [-1, 1] pixels.

A ``models_vit`` checkpoint of a ``--global_pool`` probe (``main_linprobe.py``) carries ``fc_norm`` weights and no
final ``norm``: ``fc_norm`` is kept (the backbone is built with ``fc_norm=True``, so its ``mean`` probe feature is the
official ``global_pool`` one), the missing ``norm`` becomes scale 1 / shift 0 and the classifier ``head.*`` is dropped,
each logged. Checkpoints whose positions were trained (``main_finetune.py``) are refused: maskdiff's are fixed.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch

from maskdiff.backbones.mae import DECODER_PREFIXES, MAE, MAE_SIZES, position_table
from maskdiff.methods.checkpoints import require_file
from maskdiff.convert.dit import _allow_train_args
from maskdiff.convert.layout import check_keys_and_shapes, conv_patch_embed_to_linear

log = logging.getLogger("maskdiff.convert")

OFFICIAL_MAE_URL = "https://github.com/facebookresearch/mae"
POS_EMBED_TOLERANCE = 1e-4
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OFFICIAL_DECODER = {"decoder_hidden_size": 512, "decoder_depth": 8, "decoder_num_heads": 16}

_SHAPE_KEYS = ("patch_embed.proj.weight", "cls_token", "pos_embed", "blocks.0.mlp.fc1.weight")
HEAD_PREFIX = "head."
_DECODER_SHAPE_KEYS = ("decoder_embed.weight", "decoder_pos_embed", "decoder_blocks.0.norm1.weight")


def _not_an_mae(reason: str) -> ValueError:
    return ValueError(f"{reason}; expected a facebookresearch/mae state dict ({OFFICIAL_MAE_URL}, models_mae.py)")


def is_decoder_key(key: str) -> bool:
    return key.startswith(DECODER_PREFIXES)


def unwrap_state_dict(checkpoint: Mapping) -> dict[str, torch.Tensor]:
    """The model weights of an MAE checkpoint: ``{"model": state_dict, ...}`` (releases and ``main_pretrain.py``
    checkpoints) or a bare state dict; a ``module.`` (DDP) prefix is stripped."""
    if not isinstance(checkpoint, Mapping):
        raise _not_an_mae(f"got a {type(checkpoint).__name__}, not a dict of tensors")
    if isinstance(checkpoint.get("model"), Mapping):
        checkpoint = checkpoint["model"]
    return {key.removeprefix("module."): value for key, value in checkpoint.items()}


def _count_blocks(state_dict: Mapping, prefix: str) -> int:
    depth = 0
    while f"{prefix}.{depth}.norm1.weight" in state_dict:
        depth += 1
    return depth


def _heads_for(depth: int, width: int, decoder: bool) -> int | None:
    keys = ("decoder_depth", "decoder_hidden_size", "decoder_num_heads") if decoder else ("depth", "hidden_size", "num_heads")
    for size in MAE_SIZES.values():
        if (size[keys[0]], size[keys[1]]) == (depth, width):
            return size[keys[2]]
    return None


def _require_heads(heads: int | None, depth: int, width: int, decoder: bool) -> int:
    if heads is None:
        heads = _heads_for(depth, width, decoder)
    if heads is None:
        part, arg = ("decoder", "decoder_num_heads") if decoder else ("encoder", "num_heads")
        raise ValueError(
            f"cannot infer {arg} for an MAE {part} of depth {depth} and width {width}: heads are not stored in the "
            f"weights and no MAE_SIZES entry matches ({', '.join(MAE_SIZES)}); pass {arg} explicitly"
        )
    return heads


def infer_mae_config(
    state_dict: Mapping[str, torch.Tensor], num_heads: int | None = None, decoder_num_heads: int | None = None
) -> dict:
    """:class:`MAE` init args read from the tensor shapes of an official (unwrapped) state dict.

    Heads are looked up in ``MAE_SIZES`` by (depth, width) unless given. Without decoder weights the decoder is the
    matching registry size's, else the official default (512 wide, 8 blocks, 16 heads).
    """
    missing = [key for key in _SHAPE_KEYS if key not in state_dict]
    if "norm.weight" not in state_dict and "fc_norm.weight" not in state_dict:
        missing.append("norm.weight (or fc_norm.weight)")
    if missing:
        raise _not_an_mae(f"missing key(s) {', '.join(missing)}")
    conv_weight = state_dict["patch_embed.proj.weight"]
    if conv_weight.ndim != 4 or conv_weight.shape[2] != conv_weight.shape[3]:
        raise _not_an_mae(f"patch_embed.proj.weight has shape {tuple(conv_weight.shape)}, not a square Conv2d weight (D, C, p, p)")
    hidden_size, in_channels, patch_size, _ = conv_weight.shape
    pos_embed = state_dict["pos_embed"]
    num_tokens = pos_embed.shape[-2] - 1
    grid = math.isqrt(max(num_tokens, 0))
    if pos_embed.shape != (1, num_tokens + 1, hidden_size) or grid * grid != num_tokens:
        raise _not_an_mae(f"pos_embed has shape {tuple(pos_embed.shape)}, expected (1, 1 + G*G, {hidden_size})")
    depth = _count_blocks(state_dict, "blocks")

    config = {
        "input_size": grid * patch_size,
        "patch_size": patch_size,
        "in_channels": in_channels,
        "hidden_size": hidden_size,
        "depth": depth,
        "num_heads": _require_heads(num_heads, depth, hidden_size, decoder=False),
        "mlp_ratio": state_dict["blocks.0.mlp.fc1.weight"].shape[0] / hidden_size,
    }
    if "fc_norm.weight" in state_dict:
        config["fc_norm"] = True
    if any(is_decoder_key(key) for key in state_dict):
        missing = [key for key in _DECODER_SHAPE_KEYS if key not in state_dict]
        if missing:
            raise _not_an_mae(f"decoder weights are present but key(s) {', '.join(missing)} are missing")
        decoder_hidden_size = state_dict["decoder_embed.weight"].shape[0]
        decoder_depth = _count_blocks(state_dict, "decoder_blocks")
        config |= {
            "decoder_hidden_size": decoder_hidden_size,
            "decoder_depth": decoder_depth,
            "decoder_num_heads": _require_heads(decoder_num_heads, decoder_depth, decoder_hidden_size, decoder=True),
        }
    else:
        matching = [size for size in MAE_SIZES.values()
                    if (size["depth"], size["hidden_size"], size["patch_size"]) == (depth, hidden_size, patch_size)]
        decoder = {key: matching[0][key] for key in OFFICIAL_DECODER} if matching else dict(OFFICIAL_DECODER)
        if decoder_num_heads is not None:
            decoder["decoder_num_heads"] = decoder_num_heads
        config |= decoder
    return config


def _check_positions(name: str, table: torch.Tensor, width: int, grid: tuple[int, int]) -> None:
    expected = position_table(width, grid)
    error = (table.reshape(expected.shape).float() - expected).abs().max().item()
    if not error <= POS_EMBED_TOLERANCE:
        raise ValueError(
            f"{name} differs from MAE's fixed 2-D sin-cos table (zero cls row) by {error:.3g} (tolerance "
            f"{POS_EMBED_TOLERANCE}); expected an official facebookresearch/mae checkpoint with its frozen positions"
        )


def _expected_shapes(config: dict) -> dict[str, torch.Size]:
    with torch.device("meta"):
        model = MAE(**config)
    return {key: value.shape for key, value in model.state_dict().items()}


def convert_mae_state_dict(
    official: Mapping[str, torch.Tensor], num_heads: int | None = None, decoder_num_heads: int | None = None
) -> tuple[dict[str, torch.Tensor], dict]:
    """Official MAE weights -> ``(maskdiff MAE state dict, MAE init args)``.

    ``official`` is ``{"model": state_dict}`` or a bare state dict. For an encoder-only checkpoint (the released
    ``mae_pretrain_vit_*.pth``) the returned state dict holds the encoder keys only (see :func:`is_decoder_key`).
    """
    source = unwrap_state_dict(official)
    config = infer_mae_config(source, num_heads, decoder_num_heads)
    width, patch = config["hidden_size"], config["patch_size"]
    grid = (config["input_size"] // patch,) * 2
    has_decoder = "decoder_pos_embed" in source

    _check_positions("pos_embed", source["pos_embed"], width, grid)
    if has_decoder:
        _check_positions("decoder_pos_embed", source["decoder_pos_embed"], config["decoder_hidden_size"], grid)

    dropped = sorted(key for key in source if key.startswith(HEAD_PREFIX))
    if dropped:
        log.warning("MAE checkpoint: classifier head dropped (%s)", ", ".join(dropped))
    converted = {}
    if "norm.weight" not in source:
        log.warning("MAE checkpoint without a final norm (a global_pool model): norm set to scale 1, shift 0; its mean "
                    "features read fc_norm, its cls features are not the official model's")
        converted |= {"norm.weight": torch.ones(width), "norm.bias": torch.zeros(width)}
    for key, value in source.items():
        if key in ("pos_embed", "decoder_pos_embed") or key in dropped:
            continue
        if key == "patch_embed.proj.weight":
            converted["patch_embed.weight"] = conv_patch_embed_to_linear(value)
        elif key == "patch_embed.proj.bias":
            converted["patch_embed.bias"] = value
        else:
            converted[key] = value
    converted = {key: value.contiguous() for key, value in converted.items()}

    expected = _expected_shapes(config)
    if not has_decoder:
        expected = {key: shape for key, shape in expected.items() if not is_decoder_key(key)}
    check_keys_and_shapes(converted, expected, _not_an_mae)
    return converted, config


class ImportedMAE(NamedTuple):
    """An official MAE in maskdiff form: the backbone (eval mode), its init args, and whether the decoder was loaded."""

    model: MAE
    config: dict
    decoder_loaded: bool


def mae_from_official(
    official: Mapping, num_heads: int | None = None, decoder_num_heads: int | None = None
) -> ImportedMAE:
    """Build the backbone from official weights: an encoder-only checkpoint leaves the decoder freshly initialised
    (``decoder_loaded=False``, logged as a warning); a full one loads strictly."""
    state_dict, config = convert_mae_state_dict(official, num_heads, decoder_num_heads)
    model = MAE(**config)
    decoder_loaded = any(is_decoder_key(key) for key in state_dict)
    model.load_state_dict(state_dict, strict=decoder_loaded)
    if not decoder_loaded:
        log.warning("encoder-only MAE checkpoint: the encoder is loaded, the decoder (%d blocks, width %d) is freshly "
                    "initialised", config["decoder_depth"], config["decoder_hidden_size"])
    return ImportedMAE(model.eval(), config, decoder_loaded)


def load_official_mae(
    path: str | os.PathLike, num_heads: int | None = None, decoder_num_heads: int | None = None
) -> MAE:
    """Build a maskdiff :class:`MAE` from an official checkpoint file (``mae_pretrain_vit_base.pth``: encoder only,
    fresh decoder, with a warning; ``mae_visualize_vit_large.pth``: everything). Eval mode, on the CPU; the model
    computes the official function (ImageNet-normalised pixels in and out)."""
    with _allow_train_args():
        checkpoint = torch.load(require_file(path, "MAE checkpoint"), map_location="cpu", weights_only=True)
    return mae_from_official(checkpoint, num_heads, decoder_num_heads).model


def fold_pixel_normalization(
    state_dict: Mapping[str, torch.Tensor],
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    outputs: bool = True,
) -> dict[str, torch.Tensor]:
    """Rewrite a maskdiff MAE state dict trained on ``(x01 - mean) / std`` pixels to read maskdiff's ``x = 2·x01 - 1``.

    The per-channel affine map is folded into ``patch_embed``; with ``outputs`` (pixel-loss decoders only: a
    norm-pix target cannot be folded) its inverse is folded into ``decoder_pred`` so predictions are [-1, 1] pixels.
    """
    mean_t, std_t = torch.tensor(mean, dtype=torch.float64), torch.tensor(std, dtype=torch.float64)
    folded = dict(state_dict)
    weight = state_dict["patch_embed.weight"].double()
    channels = len(mean_t)
    if weight.shape[1] % channels:
        raise ValueError(f"patch_embed takes {weight.shape[1]} values per token, not a multiple of {channels} channels")
    repeat = weight.shape[1] // channels
    scale, shift = (1 / (2 * std_t)).repeat(repeat), ((0.5 - mean_t) / std_t).repeat(repeat)
    dtype = state_dict["patch_embed.weight"].dtype
    folded["patch_embed.weight"] = (weight * scale).to(dtype)
    folded["patch_embed.bias"] = (state_dict["patch_embed.bias"].double() + weight @ shift).to(dtype)
    if outputs and "decoder_pred.weight" in state_dict:
        out_scale, out_shift = (2 * std_t).repeat(repeat), (2 * mean_t - 1).repeat(repeat)
        folded["decoder_pred.weight"] = (state_dict["decoder_pred.weight"].double() * out_scale[:, None]).to(dtype)
        folded["decoder_pred.bias"] = (state_dict["decoder_pred.bias"].double() * out_scale + out_shift).to(dtype)
    return folded
