"""docs/architecture.md lists exactly the modules in the tree."""

from __future__ import annotations

import ast
import graphlib
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


def _surgery_imports() -> dict[str, set[str]]:
    """Module -> the surgery modules it imports, and the function-level imports seen."""
    deps = {}
    for path in (ROOT / "compressor" / "surgery").glob("*.py"):
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
                "compressor.surgery"
            ):
                parts = node.module.split(".")[2:]
                found |= {parts[0]} if parts else {a.name for a in node.names}
        deps[path.stem] = found - {path.stem}
    return deps


def test_surgery_imports_form_layers_without_a_cycle():
    deps = _surgery_imports()
    deps.pop("__init__")
    graphlib.TopologicalSorter(deps).prepare()  # raises CycleError on a cycle
    assert deps["trace"] <= {"layers"} and deps["groups"] <= {"trace"}
    below_graph = {"layers", "trace", "groups", "walker", "shape_ops", "ops"}
    assert deps["graph"] <= below_graph and deps["plan"] <= {"trace", "groups"}
    assert not deps["slim"] & {"select", "streams", "pins"}  # those build on slim


def test_surgery_has_no_function_level_imports():
    nested = []
    for path in (ROOT / "compressor" / "surgery").glob("*.py"):
        for func in ast.walk(ast.parse(path.read_text())):
            if isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                nested += [
                    f"{path.name}:{n.lineno}"
                    for n in ast.walk(func)
                    if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("compressor")
                ]
    # (a heavy third-party package such as onnxruntime may still be imported lazily)
    assert not nested, f"function-level imports (an import cycle worked around): {nested}"
