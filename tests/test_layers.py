"""The package reads top-down: every maskdiff import points to the same or a lower layer, and all of them sit at the
top of their module (none hidden in a function to dodge a cycle)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "maskdiff"

# docs/architecture.md draws the same layers.
LAYERS = [
    {"diffusion", "modes", "optim", "autoencoders", "files", "checkpoint_io", "errors", "progress", "images"},
    {"corruption", "data", "scale"},
    {"backbones", "objectives", "launch"},
    {"samplers"},
    {"methods"},
    {"callbacks", "evaluation", "inpainting", "convert", "comparison"},
    {"tools"},
]
RANK = {part: rank for rank, parts in enumerate(LAYERS) for part in parts}


def part_of(module: str) -> str:
    return module.split(".")[1]


def maskdiff_imports(tree: ast.Module) -> list[tuple[ast.stmt, str]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("maskdiff."):
            found.append((node, node.module))
        elif isinstance(node, ast.Import):
            found += [(node, alias.name) for alias in node.names if alias.name.startswith("maskdiff.")]
    return found


def modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE)
        if len(relative.parts) == 1 and relative.stem == "__init__":
            continue
        yield path, relative.parts[0].removesuffix(".py"), ast.parse(path.read_text())


def test_every_folder_has_a_layer():
    assert {part for _, part, _ in modules()} <= set(RANK)


def test_nothing_imports_upward():
    upward = [f"{path.relative_to(PACKAGE)}:{node.lineno} imports {name}"
              for path, part, tree in modules() for node, name in maskdiff_imports(tree)
              if RANK[part_of(name)] > RANK[part]]
    assert not upward, upward


def test_no_function_local_maskdiff_imports():
    local = [f"{path.relative_to(PACKAGE)}:{node.lineno} imports {name}"
             for path, _, tree in modules() for node, name in maskdiff_imports(tree) if node not in tree.body]
    assert not local, local
