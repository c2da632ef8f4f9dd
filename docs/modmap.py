"""Prints the module tables of docs/architecture.md: module, lines, its docstring's first line.

python docs/modmap.py
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Every folder that is a package under these roots, methods' per-method folders included.
ROOTS = ["compressor", "cli", "exporters"]
PACKAGES = sorted(
    str(init.parent.relative_to(ROOT)) for r in ROOTS for init in (ROOT / r).rglob("__init__.py")
)


def main() -> None:
    for package in PACKAGES:
        print(f"\n### `{package}/`\n\n| module | lines | what it owns |\n|---|---|---|")
        for path in sorted((ROOT / package).glob("*.py")):
            text = path.read_text()
            doc = (ast.get_docstring(ast.parse(text)) or "").strip()
            first = doc.splitlines()[0] if doc else ""
            print(f"| `{path.name}` | {len(text.splitlines())} | {first} |")


if __name__ == "__main__":
    main()
