"""docs/reliability.md names only tests that exist: each test of a matrix row is defined in a file of that row."""

import re

from tests.helpers import ROOT

DOC = ROOT / "docs" / "reliability.md"


def test_every_test_the_reliability_matrix_names_exists():
    rows = [line for line in DOC.read_text().splitlines() if line.startswith("|") and "test_" in line]
    assert len(rows) > 30
    missing = []
    for row in rows:
        test_cell = row.rstrip(" |").rsplit("|", 1)[-1]
        files = re.findall(r"([\w/]+\.py)", test_cell)
        names = set(re.findall(r"\b(test_\w+)\b", re.sub(r"[\w/]+\.py", "", test_cell)))
        assert files, row
        defined = "\n".join((ROOT / "tests" / name).read_text() for name in files)
        missing += [f"{files}: {name}" for name in names if not re.search(rf"^def {name}\(", defined, re.M)]
    assert not missing, missing
