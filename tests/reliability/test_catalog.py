"""The docs/reliability.md table, the probe list and the tests' marks agree."""

from pathlib import Path

from .catalog import PROBES, marked_tests, render

DOC = Path(__file__).resolve().parents[2] / "docs" / "reliability.md"


def test_every_probe_is_held_by_a_test_and_every_mark_names_a_probe():
    tests = marked_tests()
    assert sorted(p.id for p in PROBES if p.id not in tests) == []
    assert sorted(set(tests) - {p.id for p in PROBES}) == []
    assert len({p.id for p in PROBES}) == len(PROBES)


def test_the_reliability_page_is_rendered_from_the_catalog():
    assert DOC.read_text(encoding="utf-8") == render(), (
        "docs/reliability.md is out of date: python -m tests.reliability.catalog > docs/reliability.md")
