"""docs/architecture.md lists exactly the modules in the tree."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ["compressor", "compressor/methods", "compressor/surgery", "cli", "exporters"]


def _listed() -> set[str]:
    text = (ROOT / "docs" / "architecture.md").read_text()
    listed, package = set(), None
    for line in text.splitlines():
        heading = re.match(r"### `([\w/]+)/`", line)
        if heading:
            package = heading.group(1)
        row = re.match(r"\| `([\w.]+\.py)` \|", line)
        if row and package:
            listed.add(f"{package}/{row.group(1)}")
    return listed


def test_the_module_map_matches_the_tree():
    present = {str(p.relative_to(ROOT)) for pkg in PACKAGES for p in (ROOT / pkg).glob("*.py")}
    listed = _listed()
    assert not present - listed, f"modules missing from docs/architecture.md: {present - listed}"
    assert not listed - present, f"docs/architecture.md lists gone modules: {listed - present}"
