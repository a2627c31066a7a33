"""The inference benchmark's quick size, for correctness only (no timing is asserted)."""

from __future__ import annotations

import pytest

from flywheel.predictor import PATHS, tolerance
from tests.benchmarks.bench_inference import FAMILIES, measure, render

pytestmark = pytest.mark.slow


def test_quick_benchmark_measures_every_path_of_every_family_within_tolerance() -> None:
    results = measure(quick=True, calls=30)
    assert [(r["family"], r["path"]) for r in results] == [(f, p) for f in FAMILIES for p in PATHS]
    for r in results:
        assert "error" not in r, r
        assert r["max_abs_diff"] <= tolerance(r["path"]), r
        assert r["verified_rows"] > r["probe_rows"] > 0, "verified on probes plus the holdout"
        assert r["single_p99_ms"] >= r["single_p50_ms"] > 0
    table = render(results)
    assert table.count("\n") == len(results) + 1 and "random_forest | onnx" in table
