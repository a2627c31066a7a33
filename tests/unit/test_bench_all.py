"""`make bench`'s aggregator and the shared benchmark helper: files written with the right fields (no timing)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.benchmarks import common
from tests.benchmarks.common import BenchResult, GrowthPoint, Record


def test_the_ratio_says_how_many_times_better_ours_is():
    assert Record(benchmark="b", name="n", ours=2.0, baseline=6.0, unit="s").ratio == 3.0
    assert Record(benchmark="b", name="n", ours=600, baseline=200, unit="rows/s", better="higher").ratio == 3.0
    assert Record(benchmark="b", name="n", ours=1.0, unit="%").ratio is None


def test_results_are_written_as_json_markdown_and_a_growth_plot(tmp_path: Path):
    ok = BenchResult(benchmark="pit", quick=True, records=[
        Record(benchmark="pit", name="join wall", ours=1.0, baseline=4.0, baseline_name="Feast", unit="s",
               target="<= 15 s", met=True)],
        growth=[GrowthPoint(stage="point-in-time join", rows=n, seconds=n / 1e4, peak_mb=100 + n / 1e3)
                for n in (1_000, 10_000, 100_000)])
    failed = BenchResult(benchmark="serving", quick=True, error="RuntimeError: feast serve did not start")
    m = common.machine()
    paths = common.write_results([ok, failed], True, m, m, 12.0, tmp_path)
    report = json.loads(paths["json"].read_text())
    assert report["quick"] is True and report["machine_before"]["cores"] >= 1
    assert report["machine_before"]["memory_mb"] > 0 and len(report["machine_after"]["load_average"]) == 3
    assert {"prefect", "feast", "mlflow", "duckdb"} <= set(report["versions"])
    (rec,) = report["benchmarks"][0]["records"]
    assert {k: rec[k] for k in ("ours", "baseline", "ratio", "unit", "target", "met")} == \
        {"ours": 1.0, "baseline": 4.0, "ratio": 4.0, "unit": "s", "target": "<= 15 s", "met": True}
    assert report["benchmarks"][1]["error"].startswith("RuntimeError")
    md = paths["md"].read_text()
    assert "QUICK run" in md and "| pit | join wall (baseline: Feast) | 1 s | 4 s | 4.00x | <= 15 s | yes |" in md
    assert "| serving | FAILED: RuntimeError: feast serve did not start" in md
    assert "| point-in-time join | 100,000 |" in md
    assert paths["png"].read_bytes()[:4] == b"\x89PNG"


def test_isolated_runs_a_function_in_a_fresh_process_and_reports_its_peak_memory():
    got = common.isolated("tests.benchmarks.common:machine")
    assert got["result"]["cores"] >= 1 and got["peak_mb"] > 10 and got["seconds"] >= 0
    with pytest.raises(RuntimeError, match="nothing_here"):
        common.isolated("tests.benchmarks.common:nothing_here")


def test_size_options_come_from_the_full_size():
    size = common.size_for({"rows": 10, "levels": (1, 2)}, {"rows": 2, "levels": (1,)}, True, {"rows": 5})
    assert size == {"rows": 5, "levels": (1,)}
    assert common._arg_type((1, 2))("3,4") == (3, 4)


@pytest.mark.slow
def test_the_aggregator_runs_a_subset_at_the_quick_size(tmp_path: Path):
    from tests.benchmarks.run_all import main

    assert main(["--quick", "--only", "ingest,retention", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "latest.json").read_text())
    assert [b["benchmark"] for b in report["benchmarks"]] == ["ingest", "retention"]
    assert all(b["records"] and not b["error"] and b["quick"] for b in report["benchmarks"])
    for b in report["benchmarks"]:
        for r in b["records"]:
            assert {"name", "ours", "baseline", "ratio", "unit", "target", "met"} <= set(r)
    growth = report["benchmarks"][0]["growth"]
    assert [g["rows"] for g in growth] == [500, 2_000, 5_000] and all(g["peak_mb"] for g in growth)
    assert (tmp_path / "latest_growth.png").is_file() and "QUICK run" in (tmp_path / "latest.md").read_text()
    with pytest.raises(SystemExit):
        main(["--quick", "--only", "nonsense"])
