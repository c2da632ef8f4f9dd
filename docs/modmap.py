"""Prints the module tables of docs/architecture.md: module, lines, its docstring's first line.

python docs/modmap.py
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ["compressor", "compressor/methods", "compressor/surgery", "cli", "exporters"]


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
