"""Retention end to end: point-in-time training sets through a real Feast repo are identical before and after
offline compaction (both join engines), and the `retention` flow runs under a real Prefect test server."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd
import pytest

from flywheel import featurestore as fs
from flywheel.settings import FeaturesConfig
from tests.unit.test_retention import _prediction, ingest_days, parts

pytestmark = pytest.mark.integration


@pytest.fixture
def offline(settings) -> Path:
    return settings.resolve(settings.paths.offline_dir)


def test_training_sets_are_identical_after_compaction(settings, dataset, offline, small_batches):
    ingest_days(small_batches, dataset, offline)
    store = fs.open_store(fs.render_repo(settings.stores, settings.paths.home))
    service = fs.apply_definitions(store, dataset, settings.features.ttl_days, offline)
    engines = {e: FeaturesConfig(join_engine=e, max_dropped_share=1.0, max_all_null_share=1.0)
               for e in ("duckdb", "feast")}
    as_of = datetime(2027, 1, 1, tzinfo=UTC)  # every label known by then
    before = {e: fs.build_training_set(store, dataset, service, cfg, offline, as_of)[0] for e, cfg in engines.items()}
    assert len(before["duckdb"]) > 50

    report = fs.compact_offline_store(dataset, offline, datetime(2026, 3, 1, tzinfo=UTC))
    assert [m.month for m in report.months] == ["2026-01", "2026-02"] and len(parts(offline, dataset)) == 2
    for engine, cfg in engines.items():
        after, join = fs.build_training_set(store, dataset, service, cfg, offline, as_of)
        pd.testing.assert_frame_equal(after, before[engine], obj=engine)
        assert join.dropped_rows == 0 or engine == "feast"


def test_the_retention_flow_purges_and_compacts(settings, dataset, offline, small_batches, prefect_harness, home):
    from flows.retention import RetentionParams, retention
    from flywheel.predictionlog import Writer

    ingest_days(small_batches[:5], dataset, offline, datetime(2026, 1, 3, tzinfo=UTC))
    now = datetime(2026, 6, 1, tzinfo=UTC)
    writer = Writer(settings.store_url(settings.serve.prediction_log_url))
    writer.add([_prediction(now - timedelta(days=d, hours=1), d) for d in range(120)])
    assert writer.flush() == 120
    writer.engine.dispose()

    result = retention(RetentionParams(profile="ci", config_dir=str(home / "configs"), now=now))
    purged = {p.table: p for p in result.purged}
    assert (purged["flywheel_predictions"].deleted, purged["flywheel_predictions"].kept) == (30, 90)
    assert result.prediction_log.days == 90 and not result.prediction_log.raised
    assert result.compaction is not None and [m.month for m in result.compaction.months] == ["2026-01"]
    assert parts(offline, dataset) == ["0000001_compacted-2026-01-to-0000005.parquet"]
    assert "| flywheel_predictions |" in result.markdown()

    again = retention(RetentionParams(profile="ci", config_dir=str(home / "configs"), now=now))
    assert [p.deleted for p in again.purged] == [0, 0, 0, 0] and again.compaction.months == []
