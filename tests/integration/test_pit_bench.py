"""The point-in-time benchmark's quick size, for correctness only (no timing is asserted)."""

from __future__ import annotations

import pytest

from tests.benchmarks.bench_pit import QUICK, measure, render

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_quick_benchmark_joins_the_same_rows_and_values_as_feast() -> None:
    result = measure(**QUICK)
    c = result["comparison"]
    assert result["flywheel"]["rows"] == result["feast"]["rows"] == QUICK["entity_rows"]
    assert (c["flywheel_missing"], c["feast_missing"], c["feast_repeated"]) == (0, 0, 0)
    assert c["cells_compared"] == QUICK["entity_rows"] * 10 and c["cells_differ"] == 0, c["differ_by_column"]
    assert 0 < c["null_cells"] < c["cells_compared"] and c["all_null_rows"] > 0, "TTL expiry and missing entities"
    for side in ("flywheel", "feast"):
        assert result[side]["seconds"] > 0 and result[side]["peak_mb"] > 0
    assert "| flywheel: DuckDB ASOF join |" in render(result)
