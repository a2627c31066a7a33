"""The retention benchmark at its quick size: correctness only (no timing asserted)."""

from __future__ import annotations

import pytest

from tests.benchmarks.bench_retention import QUICK, measure, records, render

pytestmark = pytest.mark.slow


def test_retention_bench_quick_size_keeps_the_window_and_every_offline_row():
    r = measure(**QUICK)  # asserts inside: rows younger than the cut-offs kept, offline rows identical
    kept, ret = r["kept"], r["retention"]
    assert ret["log_rows"] == QUICK["keep_days"] * QUICK["predictions_per_day"] < kept["log_rows"]
    assert ret["part_files"] < kept["part_files"] == QUICK["days"]
    assert ret["offline_rows"] == kept["offline_rows"]
    recs = {x.name.split(" after")[0]: x for x in records(r)}
    assert recs["offline part files"].ours == ret["part_files"] and recs["offline part files"].ratio > 1
    assert "with retention" in render(r)
