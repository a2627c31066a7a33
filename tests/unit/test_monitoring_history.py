"""The monitoring history table (flywheel/monitoring/history.py) on a real SQLite file in a temp folder."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd
import pytest
import sqlalchemy as sa

from flywheel import migrations
from flywheel.monitoring.alarms import judge_window
from flywheel.monitoring.config import AlarmSettings
from flywheel.monitoring.drift import ColumnDrift, DriftResult
from flywheel.monitoring.history import WINDOWS_TABLE, MonitoringHistory, window_record
from flywheel.monitoring.quality import FeatureQuality, QualityResult

DAY = timedelta(days=1)
T0 = datetime(2026, 3, 1, tzinfo=UTC)
POLICY = AlarmSettings(min_rows=100, persistence=2, drift_share=0.5)


def _judged(score: float, day: int, previous: list, rows: int = 1000, model: str = "churn", reference: str = "v1"):
    drift = DriftResult(rows=rows, columns=[ColumnDrift(
        column="tenure", kind="numeric", method="wasserstein", threshold=0.1, score=score, drifted=score >= 0.1,
        reference_count=5000, current_count=rows)])
    quality = QualityResult(rows=rows, features=[FeatureQuality(column="tenure", present=True, missing_share=0.0,
                                                                reference_missing_share=0.0)])
    verdict = judge_window(drift, quality, previous, POLICY)
    start = T0 + day * DAY
    return window_record(model, "1", reference, start, start + DAY - timedelta(seconds=1), drift, quality, verdict,
                         report_path=f"/reports/{day}.html", judged_at=start + DAY)


@pytest.fixture
def history(tmp_path: Path):
    h = MonitoringHistory(f"sqlite:///{tmp_path}/flywheel.db")
    yield h
    h.close()


def test_windows_are_recorded_and_read_back_with_their_verdicts(history: MonitoringHistory) -> None:
    rec = _judged(0.3, 0, [])
    rec_id = history.record(rec)
    (back,) = history.windows("churn")
    assert back.id == rec_id and back.model_copy(update={"id": None}) == rec.model_copy(
        update={"judged_at": back.judged_at})
    assert back.window_start == T0 and back.window_start.tzinfo is not None
    assert back.scores["tenure"] == {"method": "wasserstein", "score": 0.3, "threshold": 0.1, "drifted": True,
                                     "note": ""}
    assert back.status == "drift" and back.streak == 1 and not back.alarm and back.report_path == "/reports/0.html"


def test_persistence_reads_the_series_windows_that_ended_before(history: MonitoringHistory) -> None:
    statuses: list = []
    for day, score in enumerate([0.01, 0.3, 0.3, 0.02]):
        prev = [r.status for r in history.previous("churn", "v1", before=T0 + day * DAY)]
        assert prev == statuses, "each window sees exactly the earlier windows, oldest first"
        rec = _judged(score, day, prev)
        history.record(rec)
        statuses.append(rec.status)
    assert [r.alarm for r in history.windows("churn", "v1")] == [False, False, True, False]
    history.record(_judged(0.3, 9, [], reference="v2"))
    assert [r.reference for r in history.previous("churn", "v2", T0 + 20 * DAY)] == ["v2"], \
        "a new reference is a new series"
    assert history.previous("churn", "v1", before=T0 + DAY)[-1].window_start == T0


def test_judging_the_same_window_again_replaces_it(history: MonitoringHistory) -> None:
    history.record(_judged(0.3, 0, []))
    history.record(_judged(0.01, 0, []))
    (only,) = history.windows("churn")
    assert only.status == "ok", "a re-run must not count twice for persistence"


def test_trend_has_one_row_per_window_and_a_column_per_feature_score(history: MonitoringHistory) -> None:
    for day, score in enumerate([0.01, 0.2, 0.05]):
        history.record(_judged(score, day, []))
    trend = history.trend("churn")
    assert list(trend["score.tenure"]) == [0.01, 0.2, 0.05]
    assert {"window_end", "rows", "share_drifted", "alarm", "data_quality_alarm", "prediction_score"} <= set(trend)
    assert trend["window_end"].is_monotonic_increasing and isinstance(trend, pd.DataFrame)
    assert history.trend("other").empty


def test_the_table_comes_from_the_one_migration_path(tmp_path: Path) -> None:
    assert "flywheel.monitoring.history" in migrations.TABLE_MODULES
    url = f"sqlite:///{tmp_path}/fresh.db"
    assert WINDOWS_TABLE in migrations.upgrade(url)
    engine = sa.create_engine(url)
    assert WINDOWS_TABLE in sa.inspect(engine).get_table_names()
    engine.dispose()
