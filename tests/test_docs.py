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
