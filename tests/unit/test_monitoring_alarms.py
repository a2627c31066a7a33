"""Alarm discipline (flywheel/monitoring/alarms.py): each rule decides alone in one test."""

from __future__ import annotations

import pytest

from flywheel.monitoring.alarms import fdr_drifted, judge_window, trailing_drift
from flywheel.monitoring.config import AlarmSettings
from flywheel.monitoring.drift import ColumnDrift, DriftResult
from flywheel.monitoring.quality import FeatureQuality, QualityResult

# every rule but the one under test is made inert: no key features, persistence 1, prediction ignored
INERT = AlarmSettings(min_rows=1, fdr=None, drift_share=1.0, key_features=[], persistence=1, prediction_drift=False)


def _distance(name: str, score: float) -> ColumnDrift:
    return ColumnDrift(column=name, kind="numeric", method="wasserstein", threshold=0.1, score=score,
                       drifted=score >= 0.1, reference_count=5000, current_count=1000)


def _pvalue(name: str, p: float) -> ColumnDrift:
    return ColumnDrift(column=name, kind="numeric", method="ks", threshold=0.05, score=p, drifted=p <= 0.05,
                       reference_count=800, current_count=1000)


def _drift(columns: list[ColumnDrift], rows: int = 1000, prediction: float | None = None) -> DriftResult:
    pred = None if prediction is None else _distance("prediction", prediction)
    return DriftResult(rows=rows, columns=columns, prediction=pred)


def _policy(**kw) -> AlarmSettings:
    return INERT.model_copy(update=kw)


def test_minimum_sample_alone_turns_a_drifted_window_into_too_few_rows() -> None:
    columns = [_distance("a", 0.5), _distance("b", 0.5)]
    policy = _policy(min_rows=500, drift_share=0.5)
    assert judge_window(_drift(columns, rows=500), None, [], policy).alarm
    small = judge_window(_drift(columns, rows=499), None, [], policy)
    assert small.status == "too_few_rows" and not small.alarm
    assert small.reasons == ["too few rows: 499 < 500; not judged"]


def test_false_discovery_rate_alone_keeps_three_lucky_p_values_from_being_drift() -> None:
    # 3 of 5 KS tests at p = 0.04: each "drifted" alone (share 0.6 >= 0.5), none after Benjamini-Hochberg
    columns = [_pvalue(n, 0.04) for n in "abc"] + [_pvalue(n, 0.9) for n in "de"]
    without = judge_window(_drift(columns), None, [], _policy(drift_share=0.5))
    assert without.alarm and without.drifted_features == ["a", "b", "c"]
    with_fdr = judge_window(_drift(columns), None, [], _policy(drift_share=0.5, fdr=0.05))
    assert with_fdr.status == "ok" and not with_fdr.alarm
    assert with_fdr.drifted_features == [] and with_fdr.tests_drifted == ["a", "b", "c"]


def test_false_discovery_rate_leaves_distance_tests_alone() -> None:
    columns = [_distance("a", 0.2), _pvalue("b", 0.045), _pvalue("c", 0.0001), _pvalue("d", 0.5)]
    assert fdr_drifted(columns, 0.05) == {"a", "c"}
    assert fdr_drifted(columns, None) == {"a", "b", "c"}


def test_drift_share_alone_decides_dataset_drift() -> None:
    below = [_distance("a", 0.3), _distance("b", 0.3)] + [_distance(n, 0.01) for n in "cde"]  # 40%
    at = [_distance("a", 0.3), _distance("b", 0.3), _distance("c", 0.3)] + [_distance(n, 0.01) for n in "de"]
    policy = _policy(drift_share=0.5)
    assert judge_window(_drift(below), None, [], policy).status == "ok"
    v = judge_window(_drift(at), None, [], policy)
    assert v.status == "drift" and v.dataset_drift and v.alarm and v.share_drifted == pytest.approx(0.6)


def test_a_key_feature_alone_makes_a_window_drifted() -> None:
    columns = [_distance("key", 0.2)] + [_distance(f"f{i}", 0.01) for i in range(9)]  # 1 of 10
    assert judge_window(_drift(columns), None, [], _policy(drift_share=0.5)).status == "ok"
    v = judge_window(_drift(columns), None, [], _policy(drift_share=0.5, key_features=["key"]))
    assert v.status == "drift" and v.alarm and not v.dataset_drift and v.key_features_drifted == ["key"]


def test_prediction_drift_alone_makes_a_window_drifted_when_the_policy_says_so() -> None:
    columns = [_distance("a", 0.01), _distance("b", 0.01)]
    assert judge_window(_drift(columns, prediction=0.4), None, [], _policy()).status == "ok"
    v = judge_window(_drift(columns, prediction=0.4), None, [], _policy(prediction_drift=True))
    assert v.status == "drift" and v.alarm and v.prediction_drifted
    assert v.reasons == ["the prediction distribution drifted"]


def test_persistence_alone_needs_k_drifted_windows_in_a_row() -> None:
    drifted = _drift([_distance("a", 0.5)])
    policy = _policy(drift_share=0.5, persistence=3)
    first = judge_window(drifted, None, [], policy)
    assert first.status == "drift" and not first.alarm and first.streak == 1
    assert not judge_window(drifted, None, ["ok", "drift"], policy).alarm, "the run was broken by an ok window"
    third = judge_window(drifted, None, ["ok", "drift", "drift"], policy)
    assert third.alarm and third.streak == 3
    assert judge_window(drifted, None, ["drift", "too_few_rows", "drift"], policy).alarm, \
        "a too-few-rows window neither breaks nor extends the run"
    calm = judge_window(_drift([_distance("a", 0.01)]), None, ["drift"] * 5, policy)
    assert calm.status == "ok" and not calm.alarm and calm.streak == 0, "one calm window clears the alarm"


def test_trailing_drift_counts_the_latest_run() -> None:
    assert trailing_drift([]) == 0
    assert trailing_drift(["drift", "ok", "drift", "too_few_rows", "drift"]) == 2


def test_data_quality_is_its_own_verdict_and_never_a_retraining_signal() -> None:
    quality = QualityResult(rows=1000, features=[FeatureQuality(
        column="a", present=False, reference_missing_share=0.0, problems=["a: column missing from the window"])])
    v = judge_window(_drift([_distance("a", 0.01)]), quality, [], _policy(drift_share=0.5))
    assert v.data_quality_alarm and v.data_quality_problems == ["a: column missing from the window"]
    assert not v.alarm and not v.retrain_signal and v.status == "ok"
    small = judge_window(_drift([_distance("a", 0.01)], rows=10), quality, [], _policy(min_rows=500))
    assert not small.data_quality_alarm and small.data_quality_problems, "too few rows: recorded, never an alarm"


def test_columns_that_could_not_be_judged_are_left_out_of_the_share() -> None:
    unjudged = ColumnDrift(column="gone", kind="numeric", method="none", threshold=0.0, score=None, drifted=False,
                           reference_count=100, current_count=0, note="column missing from the window")
    v = judge_window(_drift([_distance("a", 0.5), unjudged]), None, [], _policy(drift_share=1.0))
    assert v.judged_features == 1 and v.share_drifted == 1.0 and v.alarm
