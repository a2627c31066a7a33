"""The monitoring benchmark's quick size, for correctness only (no timing is asserted)."""

from __future__ import annotations

import pytest

from tests.benchmarks.bench_monitoring import QUICK, measure, render

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_quick_benchmark_runs_both_sides_and_their_verdicts_agree() -> None:
    result = measure(**QUICK)
    ours, theirs, comparison = result["flywheel"], result["evidently"], result["comparison"]
    assert set(ours["verdicts"]) == set(theirs["verdicts"]) and len(ours["verdicts"]) == QUICK["columns"]
    assert comparison["disagreements"] == [] and comparison["method_differs"] == []
    assert comparison["drifted"], "the generated window has drifted columns"
    assert ours["quality_problems"] == 0, "generated data has no data-quality problem"
    for step in ("profile", "flywheel", "evidently"):
        assert result[step]["seconds"] > 0 and result[step]["peak_mb"] > 0
    table = render(result)
    assert "| flywheel: drift + data quality from the profile |" in table and "disagreements 0" in table
