"""Import facebookresearch/DiT checkpoints (``models.py`` state dicts) into maskdiff's :class:`DiT` backbone.

The two models compute the same function; only three tensors change layout:

* ``x_embedder.proj.weight`` ``(D, C, p, p)`` Conv2d -> ``x_embedder.weight`` ``(D, p*p*C)`` Linear over patch tokens
  in (p_row, p_col, channel) order;
* ``final_layer.linear`` rows go from (p_row, p_col, out_channel) with ``out_channel = part*C + c`` to
  ``[ε tokens ‖ variance tokens]``, i.e. (part, p_row, p_col, c);
* ``pos_embed`` (a frozen parameter in the official state dict, a computed buffer here) is checked and dropped.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
from collections.abc import Mapping

import torch

from maskdiff.backbones.dit import DIT_SIZES, DiT
from maskdiff.backbones.embeddings import sincos_2d
from maskdiff.convert.layout import check_keys_and_shapes, dit_family_state_dict, meta_shapes

OFFICIAL_DIT_URL = "https://github.com/facebookresearch/DiT"
POS_EMBED_TOLERANCE = 1e-4
OFFICIAL_CLASS_DROPOUT_PROB = 0.1

_SHAPE_KEYS = (
    "x_embedder.proj.weight",
    "pos_embed",
    "y_embedder.embedding_table.weight",
    "final_layer.linear.weight",
    "blocks.0.mlp.fc1.weight",
)


def _not_a_dit(reason: str) -> ValueError:
    return ValueError(f"{reason}; expected a facebookresearch/DiT state dict ({OFFICIAL_DIT_URL}, models.py DiT)")


def unwrap_state_dict(checkpoint: Mapping) -> dict[str, torch.Tensor]:
    """The model weights of a DiT checkpoint: a bare state dict, or DiT ``train.py``'s
    ``{"model", "ema", "opt", "args"}`` (the ``"ema"`` weights are preferred: they are the ones DiT samples with);
    a ``module.`` (DDP) prefix is stripped."""
    if not isinstance(checkpoint, Mapping):
        raise _not_a_dit(f"got a {type(checkpoint).__name__}, not a dict of tensors")
    for wrapper in ("ema", "model"):
        if isinstance(checkpoint.get(wrapper), Mapping):
            checkpoint = checkpoint[wrapper]
            break
    return {key.removeprefix("module."): value for key, value in checkpoint.items()}


def _heads_for(depth: int, hidden_size: int) -> int | None:
    for size in DIT_SIZES.values():
        if (size["depth"], size["hidden_size"]) == (depth, hidden_size):
            return size["num_heads"]
    return None


def infer_dit_config(state_dict: Mapping[str, torch.Tensor], num_heads: int | None = None) -> dict:
    """:class:`DiT` init args read from the tensor shapes of an official (unwrapped) state dict.

    ``num_heads`` is not stored in the weights: it is looked up in ``DIT_SIZES`` by ``(depth, hidden_size)`` unless
    given. The official model always has the null-class row (``rows = num_classes + 1``,
    ``class_dropout_prob = 0.1``).
    """
    missing = [key for key in _SHAPE_KEYS if key not in state_dict]
    if missing:
        raise _not_a_dit(f"missing key(s) {', '.join(missing)}")

    conv_weight = state_dict["x_embedder.proj.weight"]
    if conv_weight.ndim != 4 or conv_weight.shape[2] != conv_weight.shape[3]:
        shape = tuple(conv_weight.shape)
        raise _not_a_dit(f"x_embedder.proj.weight has shape {shape}, not a square Conv2d weight (D, C, p, p)")
    hidden_size, in_channels, patch_size, _ = conv_weight.shape

    pos_embed = state_dict["pos_embed"]
    num_tokens = pos_embed.shape[-2]
    grid = math.isqrt(num_tokens)
    if pos_embed.shape != (1, num_tokens, hidden_size) or grid * grid != num_tokens:
        raise _not_a_dit(f"pos_embed has shape {tuple(pos_embed.shape)}, expected (1, G*G, {hidden_size})")

    depth = 0
    while f"blocks.{depth}.adaLN_modulation.1.weight" in state_dict:
        depth += 1

    values_per_patch = patch_size * patch_size * in_channels
    out_features = state_dict["final_layer.linear.weight"].shape[0]
    if out_features not in (values_per_patch, 2 * values_per_patch):
        raise _not_a_dit(
            f"final_layer.linear has {out_features} outputs, expected p*p*C = {values_per_patch} "
            f"or p*p*2C = {2 * values_per_patch} (learn_sigma)"
        )

    if num_heads is None:
        num_heads = _heads_for(depth, hidden_size)
    if num_heads is None:
        raise ValueError(
            f"cannot infer num_heads for a DiT of depth {depth} and hidden size {hidden_size}: it is not stored in the "
            f"weights and no DIT_SIZES entry matches ({', '.join(DIT_SIZES)}); pass num_heads explicitly"
        )

    return dict(
        input_size=grid * patch_size,
        patch_size=patch_size,
        in_channels=in_channels,
        hidden_size=hidden_size,
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=state_dict["blocks.0.mlp.fc1.weight"].shape[0] / hidden_size,
        num_classes=state_dict["y_embedder.embedding_table.weight"].shape[0] - 1,
        class_dropout_prob=OFFICIAL_CLASS_DROPOUT_PROB,
        learn_sigma=out_features == 2 * values_per_patch,
    )


def _check_pos_embed(pos_embed: torch.Tensor, hidden_size: int, grid: int) -> None:
    expected = torch.from_numpy(sincos_2d(hidden_size, grid)).float()
    error = (pos_embed.reshape(expected.shape).float() - expected).abs().max().item()
    if not error <= POS_EMBED_TOLERANCE:
        raise ValueError(
            f"pos_embed differs from DiT's fixed 2-D sin-cos table by {error:.3g} (tolerance {POS_EMBED_TOLERANCE}); "
            "expected an official facebookresearch/DiT checkpoint with its frozen sin-cos positions"
        )


def convert_dit_state_dict(
    official: Mapping[str, torch.Tensor], num_heads: int | None = None
) -> tuple[dict[str, torch.Tensor], dict]:
    """Official DiT weights -> ``(maskdiff DiT state dict, DiT init args)``.

    ``official`` is a bare ``models.py`` state dict or a ``train.py`` checkpoint ``{"model", "ema", "opt", "args"}``,
    whose ``"ema"`` weights are used (see :func:`unwrap_state_dict`). ``num_heads`` is needed only for sizes that are
    not in ``DIT_SIZES``.
    """
    source = unwrap_state_dict(official)
    config = infer_dit_config(source, num_heads)
    patch, channels, hidden = config["patch_size"], config["in_channels"], config["hidden_size"]
    grid = config["input_size"] // patch
    parts = 2 if config["learn_sigma"] else 1

    _check_pos_embed(source["pos_embed"], hidden, grid)

    converted = dit_family_state_dict(source, patch, channels, parts, skip=lambda key: key == "pos_embed")
    check_keys_and_shapes(converted, meta_shapes(lambda: DiT(**config)), _not_a_dit)
    return converted, config


def _allow_train_args():
    """DiT's ``train.py`` pickles its ``argparse.Namespace``; allow just that class under ``weights_only``."""
    safe_globals = getattr(torch.serialization, "safe_globals", None)
    return safe_globals([argparse.Namespace]) if safe_globals else contextlib.nullcontext()


def load_official_dit(path: str | os.PathLike, num_heads: int | None = None) -> DiT:
    """Build a maskdiff :class:`DiT` from an official DiT checkpoint file (e.g. ``DiT-XL-2-256x256.pt`` or a
    ``train.py`` checkpoint, whose EMA weights are used). The model is returned in eval mode, on the CPU."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"DiT checkpoint not found: {os.fspath(path)!r}")
    with _allow_train_args():
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    state_dict, config = convert_dit_state_dict(checkpoint, num_heads)
    model = DiT(**config)
    model.load_state_dict(state_dict, strict=True)
    return model.eval()
