"""Retention and compaction on real stores: parquet folders with their ledger, SQLite project tables.

Batches are ingested at given times (`ingested_at`), so that they land in different months.
"""

from __future__ import annotations

import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd
import pytest
import sqlalchemy as sa

from flywheel import compaction
from flywheel import featurestore as fs
from flywheel.errors import FlywheelError
from flywheel.retention import cutoff, purge_monitoring_history, purge_prediction_log

JAN = datetime(2026, 1, 20, 9, 0, tzinfo=UTC)


@pytest.fixture
def offline(tmp_path: Path) -> Path:
    return tmp_path / "offline"


def ingest_days(batches, dataset, offline: Path, first: datetime = JAN) -> None:
    """One batch a day from `first` (ingest time), ids day0, day1, ..."""
    for i, batch in enumerate(batches):
        fs.ingest_batch(batch, dataset, offline, f"day{i}", ingested_at=first + timedelta(days=i))


def tables(offline: Path, dataset) -> tuple[pd.DataFrame, pd.DataFrame]:
    folder = fs.dataset_dir(offline, dataset)
    return pd.read_parquet(folder / fs.FEATURES_FILE), pd.read_parquet(folder / fs.LABELS_FILE)


def parts(offline: Path, dataset, table: str = fs.FEATURES_FILE) -> list[str]:
    return sorted(p.name for p in (fs.dataset_dir(offline, dataset) / table).iterdir())


def test_compaction_merges_finished_months_keeping_rows_ledger_and_duplicates(dataset, offline, small_batches):
    ingest_days(small_batches, dataset, offline)  # 12 batches in January, 2 in February
    before_f, before_l = tables(offline, dataset)
    ledger_before = fs.ingested_batches(dataset, offline)

    # February has not ended 7 days before March 5: only January merges
    report = fs.compact_offline_store(dataset, offline, datetime(2026, 3, 5, tzinfo=UTC) - timedelta(days=7))
    assert [(m.month, m.batches, m.files_before) for m in report.months] == [("2026-01", 12, 12)]
    assert report.months[0].feature_rows == sum(len(b) for b in small_batches[:12])
    assert (report.files_before, report.files_after) == (14, 3)
    merged = "0000001_compacted-2026-01-to-0000012.parquet"
    assert parts(offline, dataset) == parts(offline, dataset, fs.LABELS_FILE) == \
        [merged, "0000013_day12.parquet", "0000014_day13.parquet"]

    after_f, after_l = tables(offline, dataset)  # the same rows, in the same (ingest) order
    pd.testing.assert_frame_equal(after_f, before_f)
    pd.testing.assert_frame_equal(after_l, before_l)

    ledger = fs.ingested_batches(dataset, offline)
    assert set(ledger) == set(ledger_before)
    assert {ledger[f"day{i}"]["features_file"] for i in range(12)} == {merged}
    for b, e in ledger_before.items():  # digests, counts, spans unchanged
        assert {k: ledger[b][k] for k in ("digest", "feature_rows", "event_min", "event_max")} == \
            {k: e[k] for k in ("digest", "feature_rows", "event_min", "event_max")}
    lines = (fs.dataset_dir(offline, dataset) / fs.LEDGER_FILE).read_text().splitlines()
    assert len(lines) == 14, "the ledger is folded to one line per batch"

    # duplicate detection reads the ledger: a compacted batch again, or its rows under a new id, add nothing
    assert fs.ingest_batch(small_batches[3], dataset, offline, "day3").skipped
    twin = fs.ingest_batch(small_batches[3], dataset, offline, "day3-again")
    assert (twin.skipped, twin.duplicate_of) == (True, "day3")
    assert len(tables(offline, dataset)[0]) == len(before_f)

    # idempotent: the same cut-off again changes nothing; a later one merges February
    again = fs.compact_offline_store(dataset, offline, datetime(2026, 3, 5, tzinfo=UTC) - timedelta(days=7))
    assert again.months == [] and parts(offline, dataset)[0] == merged
    later = fs.compact_offline_store(dataset, offline, datetime(2026, 3, 1, tzinfo=UTC))
    assert [m.month for m in later.months] == ["2026-02"] and len(parts(offline, dataset)) == 2
    pd.testing.assert_frame_equal(tables(offline, dataset)[0], before_f)


def test_compaction_needs_an_aware_cutoff(dataset, offline, small_batches):
    ingest_days(small_batches[:2], dataset, offline)
    with pytest.raises(FlywheelError, match="tz-aware"):
        fs.compact_offline_store(dataset, offline, datetime(2026, 3, 1))


def test_a_compaction_cut_after_building_leaves_the_old_set_and_is_discarded(dataset, offline, small_batches):
    ingest_days(small_batches[:6], dataset, offline, datetime(2026, 1, 2, tzinfo=UTC))
    before = tables(offline, dataset)[0]
    names = parts(offline, dataset)
    with pytest.raises(FlywheelError, match="after building"):
        fs.compact_offline_store(dataset, offline, datetime(2026, 3, 1, tzinfo=UTC), fail_after="build")
    folder = fs.dataset_dir(offline, dataset)
    assert compaction.next_dir(folder, fs.FEATURES_FILE).is_dir(), "the new set was built beside the old one"
    assert parts(offline, dataset) == names
    pd.testing.assert_frame_equal(tables(offline, dataset)[0], before)  # each row once

    # the next writer throws the uncommitted set away; a new batch is ingested as usual
    fs.ingest_batch(small_batches[6], dataset, offline, "day6", ingested_at=datetime(2026, 3, 2, tzinfo=UTC))
    assert not compaction.next_dir(folder, fs.FEATURES_FILE).exists()
    assert parts(offline, dataset) == [*names, "0000007_day6.parquet"]
    assert len(tables(offline, dataset)[0]) == len(before) + len(small_batches[6])


def test_a_compaction_cut_after_its_commit_is_finished_by_the_next_writer(dataset, offline, small_batches):
    ingest_days(small_batches[:6], dataset, offline, datetime(2026, 1, 2, tzinfo=UTC))
    before = tables(offline, dataset)[0]
    with pytest.raises(FlywheelError, match="after its ledger commit"):
        fs.compact_offline_store(dataset, offline, datetime(2026, 3, 1, tzinfo=UTC), fail_after="commit")
    # the ledger names the merged file, the folder still holds the old set: readers count each row once
    assert fs.ingested_batches(dataset, offline)["day0"]["features_file"].startswith("0000001_compacted-2026-01")
    assert len(parts(offline, dataset)) == 6
    pd.testing.assert_frame_equal(tables(offline, dataset)[0], before)

    # the next ingest finishes the swap first (its orphan sweep must not delete the old files before that)
    fs.ingest_batch(small_batches[6], dataset, offline, "day6", ingested_at=datetime(2026, 3, 2, tzinfo=UTC))
    assert parts(offline, dataset) == ["0000001_compacted-2026-01-to-0000006.parquet", "0000007_day6.parquet"]
    got = tables(offline, dataset)[0]
    pd.testing.assert_frame_equal(got.iloc[: len(before)].reset_index(drop=True), before)
    assert len(got) == len(before) + len(small_batches[6])
    assert not compaction.next_dir(fs.dataset_dir(offline, dataset), fs.FEATURES_FILE).exists()


def test_a_fallback_swap_cut_between_its_renames_is_completed(dataset, offline, small_batches):
    ingest_days(small_batches[:3], dataset, offline)
    folder = fs.dataset_dir(offline, dataset)
    before = tables(offline, dataset)[0]
    live, staged = folder / fs.FEATURES_FILE, compaction.next_dir(folder, fs.FEATURES_FILE)
    shutil.copytree(live, staged)  # a committed new set (here: the same files) ...
    live.rename(live.with_name(live.name + ".old"))  # ... and the first rename of the two-rename swap
    assert fs.migrate_offline_store(dataset, offline)
    assert live.is_dir() and not staged.exists() and not live.with_name(live.name + ".old").exists()
    pd.testing.assert_frame_equal(tables(offline, dataset)[0], before)


# ------------------------------------------------------------------------------- the project tables


def _prediction(at: datetime, i: int) -> dict:
    return {"at": at, "request_id": f"r{i}", "entity": str(i), "model": "churn", "version": "1", "arm": "champion",
            "prediction": True, "probability": 0.7, "latency_ms": 3.0, "features": {"x": 1.0}, "imputed": []}


def test_prediction_log_keeps_what_monitoring_reads(tmp_path: Path):
    from flywheel.predictionlog import ERRORS, PREDICTIONS, Writer

    url = f"sqlite:///{tmp_path}/predictions.db"
    now = datetime(2026, 6, 30, 12, 0, tzinfo=UTC)
    writer = Writer(url)
    writer.add([_prediction(now - timedelta(days=d, minutes=1), d) for d in range(100)])
    writer.add([{**_prediction(now - timedelta(days=d, minutes=1), d), "error": "boom"} for d in range(0, 100, 10)])
    assert writer.flush() == 110
    writer.engine.dispose()

    # 7 days configured, but the performance lookback (35 days) still joins those rows to late outcomes
    cut = cutoff(now, 7, timedelta(days=35))
    assert (cut.days, cut.raised, cut.before) == (35.0, True, now - timedelta(days=35))
    purged = {p.table: p for p in purge_prediction_log(url, cut.before)}
    assert (purged[PREDICTIONS.name].deleted, purged[PREDICTIONS.name].kept) == (65, 35)  # days 0..34 stay
    assert (purged[ERRORS.name].deleted, purged[ERRORS.name].kept) == (6, 4)  # days 0, 10, 20, 30 stay
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        oldest = conn.execute(sa.select(sa.func.min(PREDICTIONS.c.at))).scalar_one()
    engine.dispose()
    assert oldest.replace(tzinfo=UTC) >= cut.before
    # a second run deletes nothing
    assert [p.deleted for p in purge_prediction_log(url, cut.before, vacuum=True)] == [0, 0]
    # a longer setting wins over the floor
    assert cutoff(now, 90, timedelta(days=35)).days == 90 and not cutoff(now, 90, timedelta(days=35)).raised


def test_monitoring_history_purge_leaves_the_audit_log(tmp_path: Path):
    from flywheel.audit import AuditLog
    from flywheel.monitoring.history import MonitoringHistory, WindowRecord, windows
    from flywheel.monitoring.realized import performance

    url = f"sqlite:///{tmp_path}/flywheel.db"
    now = datetime(2026, 6, 30, tzinfo=UTC)
    history = MonitoringHistory(url)
    for h in range(0, 24 * 60, 6):  # a window every 6 hours for 60 days
        end = now - timedelta(hours=h)
        history.record(WindowRecord(
            model="churn", version="1", reference="v1", window_start=end - timedelta(hours=1), window_end=end,
            judged_at=end, rows=600, status="ok", dataset_drift=False, share_drifted=0.0, drifted_features=[],
            scores={}, prediction_score=None, prediction_drifted=None, alarm=False, streak=0,
            data_quality_alarm=False, data_quality={}))
    history.close()
    from flywheel import migrations

    engine = sa.create_engine(url)
    migrations.ensure(engine, [performance])
    with engine.begin() as conn:
        conn.execute(performance.insert(), [{
            "model": "churn", "version": "1", "reference": "v1", "window_start": (now - timedelta(days=d, hours=1))
            .replace(tzinfo=None), "window_end": (now - timedelta(days=d)).replace(tzinfo=None),
            "evaluated_at": now.replace(tzinfo=None), "outcomes_as_of": now.replace(tzinfo=None), "scored_rows": 1,
            "labelled_rows": 1, "min_labelled_rows": 1} for d in range(60)])
    audit = AuditLog(url)
    for d in range(60):
        audit.append("churn", "champion", None, "1", "test", "user:test", at=now - timedelta(days=d))
    audit.dispose()

    cut = cutoff(now, 40, timedelta(days=35))
    purged = {p.table: p for p in purge_monitoring_history(url, cut.before)}
    assert purged[windows.name].kept == 40 * 4 + 1  # windows ending at or after now - 40 days
    assert purged[windows.name].deleted == 240 - 161
    assert (purged[performance.name].deleted, purged[performance.name].kept) == (19, 41)
    assert [p.deleted for p in purge_monitoring_history(url, cut.before)] == [0, 0]
    audit = AuditLog(url)
    assert len(audit.entries()) == 60, "the audit log is never touched"
    audit.dispose()
    engine.dispose()


# ------------------------------------------------------------------------------- the schedule


def test_retention_deployment_runs_daily_on_the_setting(settings):
    import yaml

    from flows.serve_deployments import DEPLOYMENTS_FILE, _schedules_from_settings

    (dep,) = [d for d in yaml.safe_load(DEPLOYMENTS_FILE.read_text())["deployments"] if d["name"] == "retention"]
    assert dep["entrypoint"] == "flows/retention.py:retention"
    assert dep["schedules"][0]["cron"] == settings.retention.cron, "prefect.yaml repeats retention.cron"
    owned = _schedules_from_settings(settings)["retention"]
    assert (owned.cron, owned.active) == (settings.retention.cron, True)


def test_a_bad_retention_setting_fails_at_load(home: Path):
    from flywheel.errors import ConfigError
    from flywheel.settings import load_settings

    configs = home / "configs"
    with pytest.raises(ConfigError, match=r"retention\.prediction_log_days"):
        load_settings(profile="ci", config_dir=configs, environ={"FLYWHEEL_RETENTION__PREDICTION_LOG_DAYS": "0"})
    with pytest.raises(ConfigError, match=r"retention\.cron"):
        load_settings(profile="ci", config_dir=configs, environ={"FLYWHEEL_RETENTION__CRON": "0 25 * * *"})
    off = load_settings(profile="ci", config_dir=configs, environ={"FLYWHEEL_RETENTION__COMPACT_AFTER_DAYS": "null"})
    assert off.retention.compact_after_days is None

