"""The serving benchmark's quick size, for correctness only (no timing is asserted): a trained home, Flywheel's
service and the baseline (`feast serve` + `mlflow models serve`) started on free 127.0.0.1 ports and stopped by
process group, every request of both systems answered, the same probabilities from both."""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_quick_serving_benchmark_answers_every_request_with_the_baselines_probabilities() -> None:
    from tests.benchmarks.bench_serving import QUICK, measure, records, render

    result = measure(quick=True)
    assert result["size"] == {"rows": 21 * QUICK.rows_per_day, "single": QUICK.single, "batch": QUICK.batch,
                              "batch_size": QUICK.batch_size, "warmup": QUICK.warmup}
    # the same fitted pipeline behind both: the same probabilities on the probe entities
    assert result["probe"] == 50 and result["entities_online"] >= result["probe"]
    assert float(result["max_abs_diff"]) < 1e-6, result["max_abs_diff"]
    # a champion trained and served, a second version loaded as the challenger for the memory figure
    assert result["champion_version"] == "1" and result["challenger_version"] == "2"
    fixed = result["probe"] + QUICK.warmup + max(5, QUICK.warmup // 10) + QUICK.single + QUICK.batch
    for side in ("flywheel", "baseline"):
        got = result[side]
        # a request counts once every HTTP call in it answered 200 (the baseline makes two); any other answer
        # ends the run, except at saturation, where it is counted as an error
        assert got["errors"] == 0, (side, got)
        assert got["answered"] > fixed, (side, got["answered"], fixed)  # plus at least one at saturation
        assert got["single"]["n"] == QUICK.single and got["batch"]["n"] == QUICK.batch
        for kind in ("single", "batch"):
            assert 0 < got[kind]["p50"] <= got[kind]["p99"] <= got[kind]["max"], (side, kind, got[kind])
        assert got["throughput"] > 0 and got["rate"] > 0
    assert result["rss_one_mb"] > 0 and result["rss_two_mb"] > 0 and result["baseline_rss_mb"] > 0
    recs = records(result)
    assert [r.unit for r in recs] == ["ms", "ms", "req/s", "MB"]
    for r in recs:
        assert r.ours and r.ours > 0 and r.baseline and r.baseline > 0 and r.ratio and r.ratio > 0, r
        assert r.baseline_name == "feast serve + mlflow models serve"
    assert all(isinstance(r.met, bool) for r in recs[:2])
    assert f"| requests answered (HTTP 200) | {result['flywheel']['answered']} |" in render(result)
