"""The webhook benchmark's quick size, for correctness only (no timing is asserted): a Prefect server and the
receiver started on free 127.0.0.1 ports and stopped by pid, every signed delivery accepted once, every repeat
answered as a duplicate, and exactly one event per delivery stored by the server."""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_quick_webhook_benchmark_accepts_each_delivery_once_and_stores_one_event_each() -> None:
    from tests.benchmarks.bench_webhook import QUICK, records, render, run

    r = run(**QUICK)
    n = int(QUICK["rate"] * QUICK["seconds"])
    assert r["size"] == QUICK and r["deliveries"] == n and r["warm_up"] == 20
    assert r["statuses"]["accepted"] == [202] * n
    assert r["statuses"]["duplicates"] == [200] * len(range(0, n, max(1, n // 100)))
    assert r["statuses"]["direct"] == [204] * n  # the same number of events straight to Prefect's POST /events
    assert r["events_stored"] == n + 20, "one retrain event per delivery, warm-up included, none twice"
    ms = r["accepted_ms"]
    assert 0 < ms[50] <= ms[90] <= ms[99] <= ms["max"] and r["direct_ms"][50] > 0
    assert r["startup_s"] > 0 and r["rss_mb"] > 0 and isinstance(r["target_met"], bool)
    # make bench's row: the accepted p99 beside Prefect's own POST /events at the same rate
    (row,) = records(r)
    assert (row.ours, row.baseline, row.met) == (ms[99], r["direct_ms"][99], r["target_met"])
    assert f"events stored {n + 20:,} for {n + 20:,} deliveries" == row.note
    assert "202 accepted" in render(r)
