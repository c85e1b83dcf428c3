"""The package's import graph has no cycle, and the model contract (charrnn.interfaces) needs no torch.

The graph is read from the source with :mod:`ast`, so it holds every import a module can make: at its top,
inside functions (imported on first use), under ``if TYPE_CHECKING`` and in ``try`` blocks.  An edge goes
from a module to each charrnn module it names:

- ``import charrnn.a.b`` and ``from charrnn.a import b`` (``b`` a submodule): to ``charrnn.a.b``;
- ``from charrnn.a import name`` (``name`` not a submodule): to ``charrnn.a``, the package's ``__init__``;
- relative imports (``from .. import x``) are resolved against the importing module's package first.

Importing a submodule runs its package's ``__init__`` first, but that implicit step is no edge: a package
that imports its own submodules (``from .limits import Limits`` in ``serve/__init__.py``) is no cycle.  A
submodule that imports a name from its package's ``__init__`` (``from . import SHUTDOWN_SECONDS``) is an edge
to the ``__init__``, and a cycle when that ``__init__`` imports the submodule back.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import charrnn

PACKAGE = Path(charrnn.__file__).parent
ROOT = "charrnn"


def modules(package: Path = PACKAGE) -> dict[str, Path]:
    """Every module of the package by dotted name (a package is its ``__init__.py``)."""
    found = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _is_package(name: str, known: dict[str, Path]) -> bool:
    return name in known and known[name].name == "__init__.py"


def _resolve(module: str, level: int, name: str | None, known: dict[str, Path]) -> str:
    """The absolute name of ``from <level dots><name> import ...`` written in ``module``."""
    if level == 0:
        return name or ""
    base = module.split(".") if _is_package(module, known) else module.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def _target(name: str, known: dict[str, Path]) -> str | None:
    """The charrnn module ``name`` means (its longest known prefix: ``charrnn.x.Y`` is ``charrnn.x``), if any."""
    parts = name.split(".")
    while parts:
        if ".".join(parts) in known:
            return ".".join(parts)
        parts.pop()
    return None


def imports(module: str, path: Path, known: dict[str, Path]) -> dict[str, int]:
    """The charrnn modules ``module`` imports, anywhere in its source, each with the line of its first import."""
    found: dict[str, int] = {}

    def add(name: str, line: int) -> None:
        target = _target(name, known)
        if target is not None and target != module:
            found.setdefault(target, line)

    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == ROOT or alias.name.startswith(ROOT + "."):
                    add(alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, node.level, node.module, known)
            if base != ROOT and not base.startswith(ROOT + "."):
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                add(sub if sub in known else base, node.lineno)
    return found


def import_graph(package: Path = PACKAGE) -> dict[str, dict[str, int]]:
    known = modules(package)
    return {name: imports(name, path, known) for name, path in known.items()}


def find_cycle(graph: dict[str, dict[str, int]]) -> list[str] | None:
    """One cycle of ``graph`` as ``[a, b, ..., a]``, or None (depth-first search, iterative)."""
    state: dict[str, int] = {}          # 1: on the current path, 2: done
    for start in sorted(graph):
        if start in state:
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif nxt not in state:
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph.get(nxt, {}))))
    return None


def _shown(cycle: list[str], graph: dict[str, dict[str, int]]) -> str:
    return " -> ".join(f"{a} (line {graph[a][b]})" for a, b in zip(cycle, cycle[1:])) + f" -> {cycle[-1]}"


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert "charrnn.api" in graph and "charrnn.serve.app" in graph      # the walk found the package
    cycle = find_cycle(graph)
    assert cycle is None, f"import cycle: {_shown(cycle, graph)}"


def test_the_graph_reads_relative_function_level_and_package_imports(tmp_path):
    """The rules above, on a made-up package: each kind of import is an edge, a package importing its
    submodules is not a cycle, and a cycle through a function-level import is found and named."""
    pkg = tmp_path / ROOT
    (pkg / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "from .errors import E\n",
        "errors.py": "",
        "a.py": "from . import b\n",
        "b.py": "def f():\n    from .sub.c import g\n",
        "sub/__init__.py": "from .c import g\nfrom .d import h\n",
        "sub/c.py": "from ..errors import E\ndef g():\n    import charrnn.a\n",
        "sub/d.py": "from . import c\nfrom charrnn import errors\n",
    }
    for name, text in files.items():
        (pkg / name).write_text(text)
    graph = import_graph(pkg)
    assert graph["charrnn"] == {"charrnn.errors": 1}
    assert graph["charrnn.a"] == {"charrnn.b": 1}
    assert graph["charrnn.b"] == {"charrnn.sub.c": 2}
    assert graph["charrnn.sub"] == {"charrnn.sub.c": 1, "charrnn.sub.d": 2}
    assert graph["charrnn.sub.c"] == {"charrnn.errors": 1, "charrnn.a": 3}
    assert graph["charrnn.sub.d"] == {"charrnn.sub.c": 1, "charrnn.errors": 2}
    cycle = find_cycle(graph)
    assert cycle is not None and set(cycle) == {"charrnn.a", "charrnn.b", "charrnn.sub.c"}
    assert "charrnn.b (line 2) -> charrnn.sub.c" in _shown(cycle, graph)
    (pkg / "sub/c.py").write_text("from ..errors import E\n")
    assert find_cycle(import_graph(pkg)) is None
    (pkg / "errors.py").write_text("from .sub import g\n")       # the package's __init__ is a module like any
    assert find_cycle(import_graph(pkg)) is not None


def test_the_model_contract_imports_no_torch():
    """charrnn.interfaces is what every model kind declares itself against, the torch-free runtime included."""
    code = ("import sys, charrnn.interfaces, charrnn.runtime; "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=PACKAGE.parent)
    assert out.stdout.strip() == "[]"
