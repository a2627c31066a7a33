"""The performance-estimate benchmark's quick size, for correctness only (no timing is asserted; its errors on
2,100-row windows say nothing about COVARIATE_TOLERANCE, which the full size measures)."""

from __future__ import annotations

import pytest

from tests.benchmarks.bench_performance_estimate import DRIFTS, QUICK, measure, render

pytestmark = pytest.mark.slow


def test_quick_benchmark_estimates_every_drift_window_and_tracks_the_realized_metrics() -> None:
    r = measure(**QUICK)
    rows = QUICK["window_days"] * QUICK["rows_per_day"]
    assert [(w["seed"], w["kind"], w["strength"]) for w in r["windows"]] == \
        [(s, k, x) for s in QUICK["seeds"] for k, x in DRIFTS]
    for w in r["windows"]:
        est, real, err = w["estimate"], w["realized"], w["error"]
        assert est["n"] == real["n"] == err["n"] == rows and est["n_boot"] == QUICK["n_boot"]
        for metric in ("roc_auc", "accuracy"):
            e = est[metric]
            assert 0 < e["lower"] <= e["value"] <= e["upper"] < 1, (w["kind"], w["strength"], metric, e)
            assert err[metric]["error"] == pytest.approx(e["value"] - real[metric])
            assert err[metric]["covered"] == (e["lower"] <= real[metric] <= e["upper"])
        assert 0.6 < real["roc_auc"] < 1 and 0 <= w["ece"] < 0.1
        if w["kind"] == "covariate":  # the model stays calibrated: the positive rate it expects is the one realized
            assert est["expected_positive_rate"] == pytest.approx(real["positive_rate"], abs=0.05), w
    covariate = [w for w in r["windows"] if w["kind"] == "covariate"]
    (summary,) = r["seeds"]
    assert summary["covariate_max_abs_error"]["roc_auc"] == max(w["error"]["roc_auc"]["abs_error"] for w in covariate)
    (concept,) = [w for w in r["windows"] if (w["kind"], w["strength"]) == ("concept", 1.0)]
    assert summary["concept_1_gap"]["accuracy"] == concept["error"]["accuracy"]["error"]
    assert f"| {QUICK['seeds'][0]} | " in render(r) and "COVARIATE_TOLERANCE" in render(r)
