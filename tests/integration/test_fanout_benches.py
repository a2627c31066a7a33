"""The Dask fan-out benchmarks at their quick sizes, for correctness only (no timing is asserted): the search
and the batch scoring each run serially and on a local Dask cluster, and must agree."""

from __future__ import annotations

import re

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_quick_search_fanout_selects_what_the_serial_search_does() -> None:
    from tests.benchmarks.bench_fanout import QUICK, bench

    result = bench(quick=True)
    assert result.error is None, result.error
    assert result.size["rows"] > 0 and result.records, result
    assert "same selected model and metrics: True" in result.detail, result.detail
    assert "same child runs: True" in result.detail, result.detail
    assert result.size["workers"] == QUICK["workers"]


def test_quick_batch_fanout_writes_the_same_rows_and_scores_as_the_serial_run() -> None:
    from tests.benchmarks.bench_batch_fanout import QUICK, bench

    result = bench(quick=True)
    assert result.error is None, result.error  # it once fell behind score_entities' signature (scored_at)
    assert set(result.size) == {"rows", "entities", "workers", "partition_rows"}, result.size
    assert (result.size["workers"], result.size["partition_rows"]) == (QUICK["workers"], QUICK["partition_rows"])
    assert result.size["rows"] > 0 and result.size["entities"] > QUICK["partition_rows"], result.size
    assert "same rows and scores: True" in result.detail, result.detail
    # the partitions together read the rows the serial pass read, no whole-store scan per partition
    read = re.search(r"rows read: serial ([\d,]+), dask partitions together ([\d,]+)", result.detail)
    assert read is not None and read.group(1) == read.group(2) != "0", result.detail
