"""The documents a user reads: generated ones up to date, nothing pointing at files users do not have."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_performance_page_is_rendered_from_the_committed_results():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "render_performance.py"), "--check"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, ("docs/performance.md is out of date: run python benchmarks/render_performance.py\n"
                                 + out.stdout + out.stderr)


def test_user_documents_never_point_into_the_developers_shared_folder():
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        assert "../shared" not in path.read_text(encoding="utf-8"), path


def test_readme_stays_a_manual_of_about_300_lines():
    assert len((ROOT / "README.md").read_text(encoding="utf-8").splitlines()) <= 330


def _package_map():
    """The code block under docs/design.md's "## The package", as its lines."""
    text = (ROOT / "docs" / "design.md").read_text(encoding="utf-8")
    section = text.split("\n## The package\n", 1)[1].split("\n## ", 1)[0]
    return section.split("```", 2)[1].splitlines()


def test_the_package_map_names_every_module():
    """docs/design.md's package map names every module and subpackage of charrnn.

    The rule.  An *entry* of the map is a line indented by exactly two spaces; its *names* are the
    text before the first run of two or more spaces (``errors.py, fileio.py``, ``models/``), the rest
    is its description.  A subpackage's *section* runs from its entry to the next entry.

    - A module of the package itself (``charrnn/X.py``) is among the names of an entry.
    - A subpackage (``charrnn/X/`` with an ``__init__.py``) is an entry's name, written ``X/``.
    - A module or subpackage inside one (``charrnn/X/Y.py``, ``charrnn/X/Y/...``) appears as ``Y.py``
      (``Y/``) anywhere in ``X/``'s section, names or description.

    ``__init__.py`` and ``__main__.py`` are the package machinery and are not listed.  A name
    matches as a whole word: ``cli.py`` is not matched by ``tasks_cli.py``."""
    import re

    package = ROOT / "charrnn"
    entries = []  # (names, lines of its section)
    for line in _package_map()[1:]:  # [0] is "charrnn/"
        if re.match(r"  \S", line):
            entries.append((re.split(r"\s{2,}", line.strip(), maxsplit=1)[0], [line]))
        elif entries:
            entries[-1][1].append(line)

    def named(name, text):
        return re.search(r"(?<![\w./])" + re.escape(name) + r"(?![\w/])", text) is not None

    def listed(name):
        return any(named(name, names) for names, _ in entries)

    def in_section(top, name):
        return any(named(name, "\n".join(lines)) for names, lines in entries if named(top + "/", names))

    missing = []
    for path in sorted(package.rglob("*")):
        rel = path.relative_to(package)
        if "__pycache__" in rel.parts:
            continue
        if path.is_dir():
            if not (path / "__init__.py").exists():
                continue  # csrc/, serve/static/: data, not Python
            name = rel.name + "/"
        elif path.suffix == ".py" and path.name not in ("__init__.py", "__main__.py"):
            name = rel.name
        else:
            continue
        ok = listed(name) if len(rel.parts) == 1 else in_section(rel.parts[0], name)
        if not ok:
            missing.append(str(rel) + ("/" if path.is_dir() else ""))
    assert not missing, ("docs/design.md's package map (under '## The package') does not name: "
                         + ", ".join(missing))
