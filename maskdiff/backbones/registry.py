"""Named backbone sizes: ``create_backbone("DiT-S/2", input_size=32)`` builds a configured module."""

from __future__ import annotations

from typing import Callable

from torch import nn

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_backbone(name: str, factory: Callable[..., nn.Module]) -> None:
    if name in _REGISTRY:
        raise ValueError(f"backbone {name!r} is already registered")
    _REGISTRY[name] = factory


def list_backbones(prefix: str = "") -> list[str]:
    return sorted(name for name in _REGISTRY if name.startswith(prefix))


def create_backbone(name: str, **overrides) -> nn.Module:
    """Build the registered size ``name``; keyword ``overrides`` replace its defaults (e.g. ``input_size``)."""
    if name not in _REGISTRY:
        raise KeyError(f"unknown backbone {name!r}; registered: {', '.join(list_backbones())}")
    return _REGISTRY[name](**overrides)
