"""Print each of pyproject.toml's [project].dependencies pinned to its lower bound, one requirement a line.

    python3 .ci/min_pins.py            # e.g. torch==2.6, lightning==2.5.5, jsonargparse[signatures]==4.30, ...

A dependency without a ``>=`` bound is an error: the minimum-versions check must know what to install.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

REQUIREMENT = re.compile(r"^\s*(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)(?P<extras>\[[^\]]*\])?\s*(?P<specifiers>[^;]*)")


def lower_bound_pins(dependencies: list[str]) -> list[str]:
    """``name[extras]==minimum`` for every requirement string of ``dependencies`` (its ``>=`` specifier)."""
    pins = []
    for requirement in dependencies:
        match = REQUIREMENT.match(requirement)
        if match is None:
            raise ValueError(f"cannot read the requirement {requirement!r}")
        bounds = [spec.strip()[2:].strip() for spec in match["specifiers"].split(",") if spec.strip().startswith(">=")]
        if len(bounds) != 1:
            raise ValueError(f"{requirement!r} needs exactly one '>=' lower bound")
        pins.append(f"{match['name']}{match['extras'] or ''}=={bounds[0]}")
    return pins


def main() -> None:
    pyproject = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parents[1] / "pyproject.toml")
    print("\n".join(lower_bound_pins(tomllib.loads(pyproject.read_text())["project"]["dependencies"])))


if __name__ == "__main__":
    main()
