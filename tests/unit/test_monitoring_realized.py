"""Realized performance per monitoring window (flywheel/monitoring/realized.py): the pure pieces on tiny
frames, the append-only table on a real SQLite file, and `refresh_realized` on a real prediction log and
outcome store, including a label known before its prediction."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from flywheel.monitoring.alarms import judge_window
from flywheel.monitoring.config import AlarmSettings
from flywheel.monitoring.drift import ColumnDrift, DriftResult
from flywheel.monitoring.history import MonitoringHistory, window_record
from flywheel.monitoring.performance import estimate_performance, realized_performance
from flywheel.monitoring.quality import QualityResult
from flywheel.monitoring.realized import (
    PerformanceHistory,
    assign_windows,
    realized_reading,
    refresh_realized,
    window_performance,
)

T0 = datetime(2026, 3, 1, tzinfo=UTC)
HOUR = timedelta(hours=1)


def _window(hour: int, rows: int = 100, version: str | None = "1"):
    drift = DriftResult(rows=rows, columns=[ColumnDrift(column="x", kind="numeric", method="wasserstein",
                                                        threshold=0.1, score=0.01, drifted=False,
                                                        reference_count=1000, current_count=rows)])
    quality = QualityResult(rows=rows, features=[])
    verdict = judge_window(drift, quality, [], AlarmSettings(min_rows=10))
    start = T0 + hour * HOUR
    return window_record("churn", version, f"v{version}" if version else "profile:abc", start, start + HOUR, drift,
                         quality, verdict, None, start + HOUR)


def _labels(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    p = rng.uniform(0.05, 0.95, n)
    return (rng.random(n) < p).astype(int), p


def test_assign_windows_puts_each_time_in_its_half_open_window() -> None:
    ws = [_window(0), _window(1)]
    at = pd.Series([T0, T0 + HOUR - timedelta(seconds=1), T0 + HOUR, T0 + 2 * HOUR, T0 - HOUR])
    assert assign_windows(at, ws).tolist() == [0, 0, 1, -1, -1]


def test_below_the_minimum_only_the_counts_are_recorded() -> None:
    y, p = _labels(40)
    rec = window_performance(_window(0), 100, y, p, 50, evaluated_at=T0, outcomes_as_of=T0)
    assert (rec.labelled_rows, rec.realized, rec.realized_roc_auc, rec.estimated_roc_auc) == (40, False, None, None)
    assert "not enough outcomes yet" in rec.summary() and realized_reading(rec) is None


def test_realized_is_beside_the_estimate_on_the_same_rows() -> None:
    y, p = _labels(300, seed=3)
    rec = window_performance(_window(0), 400, y, p, 50, evaluated_at=T0, outcomes_as_of=T0, seed=7)
    truth, est = realized_performance(y, p), estimate_performance(p, 200, 0.95, 7)
    assert rec.realized and rec.labelled_rows == 300 and rec.scored_rows == 400
    assert rec.realized_roc_auc == pytest.approx(truth.roc_auc)
    assert rec.estimated_roc_auc == pytest.approx(est.roc_auc.value)
    assert rec.roc_auc_error == pytest.approx(est.roc_auc.value - truth.roc_auc)
    assert rec.accuracy_error == pytest.approx(est.accuracy.value - truth.accuracy)
    reading = realized_reading(rec)
    assert reading.n == 300 and reading.roc_auc == pytest.approx(truth.roc_auc)


def test_one_class_of_labels_gives_no_auc_but_an_accuracy() -> None:
    p = np.linspace(0.1, 0.9, 60)
    rec = window_performance(_window(0), 60, np.zeros(60, int), p, 50, evaluated_at=T0, outcomes_as_of=T0)
    assert rec.realized and rec.realized_roc_auc is None and rec.roc_auc_covered is None
    assert rec.realized_accuracy == pytest.approx(float(np.mean(p < 0.5)))


def test_evaluations_are_appended_and_the_latest_is_the_current_figure(tmp_path: Path) -> None:
    history = PerformanceHistory(f"sqlite:///{tmp_path}/flywheel.db")
    try:
        w = _window(0)
        y, p = _labels(80)
        first = window_performance(w, 100, y[:30], p[:30], 50, evaluated_at=T0, outcomes_as_of=T0)
        second = window_performance(w, 100, y, p, 50, evaluated_at=T0 + HOUR, outcomes_as_of=T0 + HOUR)
        history.record(first)
        history.record(second)
        assert [e.labelled_rows for e in history.evaluations("churn")] == [30, 80], "both kept, in order"
        (latest,) = history.latest("churn").values()
        assert latest.labelled_rows == 80 and latest.realized and latest.evaluated_at == T0 + HOUR
        assert latest.key == w.key
    finally:
        history.close()


# ------------------------------------------------------------------ refresh on real stores


@pytest.fixture
def stores(tmp_path: Path, dataset):
    """A project database with two judged windows of churn v1 (hours 0 and 1) and a prediction log."""
    url = f"sqlite:///{tmp_path}/flywheel.db"
    log_url = f"sqlite:///{tmp_path}/predictions.db"
    history = MonitoringHistory(url)
    for hour in (0, 1):
        history.record(_window(hour))
    history.record(_window(0, version=None))  # judged against a file: no served predictions, left out
    history.close()
    return url, log_url, dataset


def _log(log_url: str, rows: list[tuple[int, datetime, datetime | None, float]]) -> None:
    from flywheel.predictionlog import Writer

    writer = Writer(log_url)
    writer.add([{"at": at, "request_id": f"r{i}", "entity": str(e), "model": "churn", "version": "1",
                 "arm": "champion", "prediction": p >= 0.5, "probability": p, "latency_ms": 1.0, "features": {},
                 "imputed": [], "explanation": None, "shadow": False, "feature_time": ft}
                for i, (e, at, ft, p) in enumerate(rows)])
    assert writer.flush() == len(rows)
    writer.engine.dispose()


def _outcomes(url: str, dataset, rows: list[tuple[int, datetime, str, datetime]]) -> None:
    from flywheel.outcomes import OutcomeStore, outcome_rows

    frame = pd.DataFrame(rows, columns=[dataset.entity, dataset.timestamp, dataset.label, dataset.label_timestamp])
    store = OutcomeStore(url)
    try:
        store.ingest(outcome_rows(frame, dataset), dataset, source="test")
    finally:
        store.close()


def test_refresh_fills_in_earlier_windows_as_their_outcomes_land(stores) -> None:
    url, log_url, dataset = stores
    snap = T0 - timedelta(days=1)  # the feature snapshot every prediction used
    # hour 0: entities 0..5 (entity 5 has no snapshot: a raw row); hour 1: entities 10..13
    _log(log_url, [(e, T0 + timedelta(minutes=e), snap, 0.2 + 0.1 * e) for e in range(5)]
         + [(5, T0 + timedelta(minutes=5), None, 0.5)]
         + [(e, T0 + HOUR + timedelta(minutes=1), snap, 0.3) for e in range(10, 14)])
    later = T0 + 3 * HOUR
    # entity 0's label was known before its prediction (first arrival), delivered again later: never used
    _outcomes(url, dataset, [(0, snap, "yes", T0 - HOUR)])
    _outcomes(url, dataset, [(e, snap, "yes" if e % 2 else "no", later) for e in (0, 1, 2, 3, 4, 5)])

    def refresh(now: datetime):
        return refresh_realized(url, log_url, url, dataset, "churn", now, timedelta(days=35), 3)

    assert refresh(T0 + 2 * HOUR) == [], "no outcome had arrived by then"
    (first,) = refresh(later + HOUR)
    assert (first.window_start, first.scored_rows, first.labelled_rows) == (T0, 5, 4), first
    y = np.array([1, 0, 1, 0])
    assert first.realized_roc_auc == pytest.approx(realized_performance(y, np.array([0.3, 0.4, 0.5, 0.6])).roc_auc)
    assert refresh(later + 2 * HOUR) == [], "nothing new: nothing appended"

    _outcomes(url, dataset, [(e, snap, "no", later + 3 * HOUR) for e in (10, 11)])
    (second,) = refresh(later + 4 * HOUR)
    assert (second.window_start, second.labelled_rows, second.realized) == (T0 + HOUR, 2, False), second

    history = PerformanceHistory(url)
    try:
        assert [(e.window_start, e.labelled_rows) for e in history.evaluations("churn")] == [(T0, 4), (T0 + HOUR, 2)]
    finally:
        history.close()


def test_windows_beyond_the_lookback_are_not_joined_again(stores) -> None:
    url, log_url, dataset = stores
    snap = T0 - timedelta(days=1)
    _log(log_url, [(e, T0 + timedelta(minutes=e), snap, 0.4) for e in range(4)])
    _outcomes(url, dataset, [(e, snap, "yes", T0 + 2 * HOUR) for e in range(4)])
    far = T0 + timedelta(days=40)
    assert refresh_realized(url, log_url, url, dataset, "churn", far, timedelta(days=35), 1) == []
    (rec,) = refresh_realized(url, log_url, url, dataset, "churn", far, timedelta(days=41), 1)
    assert rec.labelled_rows == 4
