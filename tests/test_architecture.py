"""docs/architecture.md lists exactly the modules in the tree."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Every folder that is a package under these roots, methods' per-method folders included.
ROOTS = ["compressor", "cli", "exporters"]
PACKAGES = sorted(
    str(init.parent.relative_to(ROOT)) for r in ROOTS for init in (ROOT / r).rglob("__init__.py")
)


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
