"""The ingest benchmark's quick size, for correctness only (no timing is asserted)."""

from __future__ import annotations

from tests.benchmarks.bench_ingest import QUICK, measure, render


def test_quick_ingest_benchmark_grows_the_store_one_part_per_batch() -> None:
    result = measure(**QUICK)  # asserts inside: row counts, one part per batch, ingest order on read-back
    assert [r["existing_batches"] for r in result["levels"]] == list(QUICK["levels"])
    assert all(r["flywheel_ms"] > 0 and r["single_file_ms"] > 0 for r in result["levels"])
    assert "| 10 | 500 |" in render(result)
    assert all(r["flywheel_cpu_ms"] > 0 for r in result["levels"])
