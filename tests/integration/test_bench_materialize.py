"""The materialization benchmark's quick size, for correctness only (no timing is asserted)."""

from __future__ import annotations

import shutil

import pytest

from tests.benchmarks.bench_materialize import QUICK, measure, render

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_quick_benchmark_loads_both_stores_with_the_values_feast_writes() -> None:
    stores = ("sqlite", "redis") if shutil.which("redis-server") else ("sqlite",)
    result = measure(stores=stores, **QUICK)  # asserts inside: same values and times on a sample, one row per entity
    for kind in stores:
        r = result["stores"][kind]
        assert r["differ"] == 0 and r["compared"] > 300 and r["entity_rows"] <= QUICK["entities"]
        assert r["feast_seconds"] > 0 and r["flywheel_seconds"] > 0
    assert "| sqlite |" in render(result)
