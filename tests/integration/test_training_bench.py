"""The training benchmark's quick size, for correctness only (no timing is asserted): a Prefect server started and
stopped by pid, the training pipeline run once as plain task functions and once as the flow through that server,
both registering a model, and the growth points fitted in fresh processes."""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_quick_training_benchmark_registers_a_champion_both_ways() -> None:
    from tests.benchmarks.bench_training import GROWTH, QUICK, bench

    result = bench(quick=True)
    assert result.error is None, result.error
    assert result.quick and result.size == QUICK, result.size
    # both arms ran the whole pipeline on a fresh home: each registered v1 as the first champion
    assert "| registered | direct: champion v1; prefect: champion v1 |" in result.detail, result.detail
    flow, overhead = result.records
    assert flow.unit == "s" and flow.ours and flow.ours > 0 and flow.baseline and flow.baseline > 0
    assert flow.baseline_name and flow.ratio and flow.ratio > 0
    assert f"{QUICK['rows']:,} rows" in flow.name and "median of 1" in flow.name
    assert overhead.unit == "%" and overhead.ours is not None and overhead.target == "<= 5%"
    assert isinstance(overhead.met, bool) and "server start-up" in overhead.note
    assert [g.stage for g in result.growth] == ["training (one fit)"] * 3
    for point, rows in zip(result.growth, GROWTH["quick"], strict=True):
        assert 0.9 * rows <= point.rows <= rows and point.seconds > 0 and point.peak_mb and point.peak_mb > 0
