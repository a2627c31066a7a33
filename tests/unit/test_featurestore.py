"""Offline ingest of the Feast stage: pure file work (no Feast import), on the small churn batches."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from flywheel import featurestore as fs
from flywheel.errors import FlywheelError


@pytest.fixture
def offline(tmp_path: Path) -> Path:
    return tmp_path / "offline"


def test_ingest_is_idempotent_per_batch(dataset, offline, small_batches):
    batch = small_batches[0]
    first = fs.ingest_batch(batch, dataset, offline, "day0")
    again = fs.ingest_batch(batch, dataset, offline, "day0")
    assert (first.skipped, first.feature_rows, first.label_rows) == (False, len(batch), len(batch))
    assert (again.skipped, again.feature_rows, again.total_feature_rows) == (True, 0, len(batch))
    assert list(fs.ingested_batches(dataset, offline)) == ["day0"]

    # a crash between the two writes heals on the retry: only the missing file gets the batch
    Path(first.labels_path).unlink()
    healed = fs.ingest_batch(batch, dataset, offline, "day0")
    assert (healed.feature_rows, healed.label_rows, healed.total_feature_rows) == (0, len(batch), len(batch))

    stored = pd.read_parquet(first.features_path)
    assert str(stored[dataset.timestamp].dtype) == "datetime64[us, UTC]"
    labels = pd.read_parquet(first.labels_path)
    assert set(dataset.context_columns) <= set(labels.columns)
    assert dataset.label_timestamp in labels.columns


def test_ingest_refuses_naive_timestamps_and_missing_columns(dataset, offline, small_batches):
    naive = small_batches[0].assign(event_timestamp=small_batches[0]["event_timestamp"].dt.tz_localize(None))
    with pytest.raises(FlywheelError, match="naive"):
        fs.ingest_batch(naive, dataset, offline, "naive")
    with pytest.raises(FlywheelError, match="tenure_months"):
        fs.ingest_batch(small_batches[0].drop(columns=["tenure_months"]), dataset, offline, "short")



def test_int_features_refuse_fractions(dataset, offline, small_batches):
    bad = small_batches[0].assign(tenure_months=small_batches[0]["tenure_months"] + 0.5)
    with pytest.raises(FlywheelError, match="tenure_months"):
        fs.ingest_batch(bad, dataset, offline, "fractions")


def test_batch_id_is_the_file_name_without_extension():
    from tasks.features import batch_id

    assert batch_id(Path("/x/batch_2026-01-01.parquet")) == "batch_2026-01-01"
    assert batch_id(Path("batch_2026-01-01.csv")) == "batch_2026-01-01"


def test_join_report_markdown_names_the_counts():
    report = fs.JoinReport(service="churn_0123abcd", entity_rows=10, returned_rows=9, dropped_rows=1,
                           all_null_rows=2, dropped_share=0.1, all_null_share=0.2, training_rows=7)
    md = report.to_markdown()
    assert "churn_0123abcd" in md and "| dropped by the join | 1 (10.00%) |" in md
