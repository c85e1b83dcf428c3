"""The longest functions, classes and files of a package, as JSON (a structure check anyone can run).

    python benchmarks/code_shape.py [PACKAGE_DIR] [--top N]

Lengths count every line from a definition's first line to its last (docstrings and comments included).
"""
from __future__ import annotations

import argparse
import ast
import json
from pathlib import Path


def shapes(root: Path) -> dict:
    files, functions, classes = [], [], []
    for path in sorted(root.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        name = str(path.relative_to(root.parent))
        files.append((len(text.splitlines()), name))
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                functions.append((node.end_lineno - node.lineno + 1, f"{name}:{node.lineno} {node.name}"))
            elif isinstance(node, ast.ClassDef):
                classes.append((node.end_lineno - node.lineno + 1, f"{name}:{node.lineno} {node.name}"))
    return {"files": files, "functions": functions, "classes": classes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("package", nargs="?", default=str(Path(__file__).resolve().parents[1] / "charrnn"))
    parser.add_argument("--top", type=int, default=10)
    args = parser.parse_args()
    found = shapes(Path(args.package).resolve())
    result = {kind: [{"lines": n, "where": w} for n, w in sorted(items, reverse=True)[:args.top]]
              for kind, items in found.items()}
    result["functions_over_60_lines"] = sum(n > 60 for n, _ in found["functions"])
    result["python_lines"] = sum(n for n, _ in found["files"])
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
