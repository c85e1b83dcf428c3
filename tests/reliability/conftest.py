import pytest

from .catalog import PROBES


def pytest_collection_modifyitems(items):
    known = {p.id for p in PROBES}
    for item in items:
        for mark in item.iter_markers("probe"):
            if mark.args[0] not in known:
                raise pytest.UsageError(f"{item.nodeid}: probe {mark.args[0]!r} is not in tests/reliability/catalog.py")
