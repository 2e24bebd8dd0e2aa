"""Layout conversions shared by the official-checkpoint importers (DiT family and ViT family)."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch


def conv_patch_embed_to_linear(weight: torch.Tensor) -> torch.Tensor:
    """Conv2d patch embedding ``(D, C, p, p)`` -> the equivalent Linear over patch tokens ``(D, p*p*C)``."""
    return weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1)


def tokens_major_output(tensor: torch.Tensor, pixels_per_patch: int, parts: int, channels: int) -> torch.Tensor:
    """Output rows (p_row, p_col, part*C + c) -> (part, p_row, p_col, c); ``tensor (rows, ...)``."""
    rest = tensor.shape[1:]
    grouped = tensor.reshape(pixels_per_patch, parts, channels, *rest)
    return grouped.transpose(0, 1).reshape(parts * pixels_per_patch * channels, *rest)


def check_keys_and_shapes(
    converted: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Size], error: Callable[[str], Exception]
) -> None:
    """Raise ``error(reason)`` naming missing / unexpected keys or mismatched shapes."""
    missing = sorted(set(expected) - set(converted))
    if missing:
        raise error(f"missing key(s) {', '.join(missing)}")
    unexpected = sorted(set(converted) - set(expected))
    if unexpected:
        raise error(f"unexpected key(s) {', '.join(unexpected)}")
    mismatched = [
        f"{key} {tuple(converted[key].shape)} (expected {tuple(shape)})"
        for key, shape in expected.items()
        if converted[key].shape != shape
    ]
    if mismatched:
        raise error(f"shape mismatch for {', '.join(mismatched)}")


def meta_shapes(build: Callable[[], torch.nn.Module]) -> dict[str, torch.Size]:
    """State-dict shapes of ``build()`` constructed on the meta device (no memory, no init cost)."""
    with torch.device("meta"):
        model = build()
    return {key: value.shape for key, value in model.state_dict().items()}


def dit_family_state_dict(
    source: Mapping[str, torch.Tensor], patch_size: int, channels: int, parts: int, skip: Callable[[str], bool]
) -> dict[str, torch.Tensor]:
    """Official DiT-family weights (DiT, MDT) in maskdiff's layout: the conv patch embedding becomes a Linear over
    tokens, the output rows become ``[part ‖ ...]`` token layout, keys for which ``skip(key)`` is true are dropped."""
    converted = {}
    for key, value in source.items():
        if skip(key):
            continue
        if key == "x_embedder.proj.weight":
            converted["x_embedder.weight"] = conv_patch_embed_to_linear(value)
        elif key == "x_embedder.proj.bias":
            converted["x_embedder.bias"] = value
        elif key.startswith("final_layer.linear."):
            converted[key] = tokens_major_output(value, patch_size * patch_size, parts, channels)
        else:
            converted[key] = value
    return {key: value.contiguous() for key, value in converted.items()}
