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

    # the same rows under another id are a duplicate: recorded, nothing stored
    twin = fs.ingest_batch(batch, dataset, offline, "day0-copy")
    assert (twin.skipped, twin.duplicate_of, twin.total_feature_rows) == (True, "day0", len(batch))
    # the same id with other rows is refused, naming the batch
    with pytest.raises(FlywheelError, match=r"'day0' .* different rows"):
        fs.ingest_batch(small_batches[1], dataset, offline, "day0")

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


def test_each_batch_is_one_new_part_and_earlier_parts_are_untouched(dataset, offline, small_batches):
    fs.ingest_batch(small_batches[0], dataset, offline, "day0")
    folder = Path(fs.ingest_batch(small_batches[1], dataset, offline, "day1").features_path)
    first = sorted(folder.iterdir())[0]
    stamp = first.stat().st_mtime_ns, first.stat().st_ino
    report = fs.ingest_batch(small_batches[2], dataset, offline, "day2")
    parts = sorted(p.name for p in folder.iterdir())
    assert parts == ["0000001_day0.parquet", "0000002_day1.parquet", "0000003_day2.parquet"]
    assert (first.stat().st_mtime_ns, first.stat().st_ino) == stamp
    assert sorted(p.name for p in Path(report.labels_path).iterdir()) == parts
    # read back as one table, in ingest order
    stored = pd.read_parquet(folder)
    assert stored[fs.BATCH_COLUMN].tolist() == ["day0"] * 300 + ["day1"] * 300 + ["day2"] * 300
    assert report.total_feature_rows == len(stored) == 900
    entry = fs.ingested_batches(dataset, offline)["day1"]
    assert entry["feature_rows"] == 300 and len(entry["digest"]) == 64
    assert pd.Timestamp(entry["event_min"]) == small_batches[1][dataset.timestamp].min()


def test_a_write_that_died_before_the_ledger_leaves_nothing_behind(dataset, offline, small_batches):
    first = fs.ingest_batch(small_batches[0], dataset, offline, "day0")
    folder = Path(first.features_path)
    # what a writer killed between its part file and the ledger leaves: a part no ledger entry names, a temp file
    (folder / "0000002_lost.parquet").write_bytes((folder / "0000001_day0.parquet").read_bytes())
    (folder.parent / ".features.parquet.0000002_day1.parquet.99.tmp").write_bytes(b"half")
    with open(folder.parent / fs.LEDGER_FILE, "a") as fh:  # and the torn start of its ledger record
        fh.write('{"batch": "lost", "feature_rows": 30')
    assert list(fs.ingested_batches(dataset, offline)) == ["day0"], "a torn record is not committed"
    fs.ingest_batch(small_batches[1], dataset, offline, "day1")
    stored = pd.read_parquet(folder)
    assert stored[fs.BATCH_COLUMN].value_counts().to_dict() == {"day0": 300, "day1": 300}
    assert not list(folder.parent.glob(".*.tmp"))
    assert list(fs.ingested_batches(dataset, offline)) == ["day0", "day1"]
    assert sorted(p.name for p in folder.iterdir()) == ["0000001_day0.parquet", "0000002_day1.parquet"]


def test_all_null_optional_column_in_the_first_batch_keeps_the_table_readable(dataset, offline, small_batches):
    category = next(f.name for f in dataset.features if f.type == "category")
    fs.ingest_batch(small_batches[0].assign(**{category: None}), dataset, offline, "day0")
    fs.ingest_batch(small_batches[1], dataset, offline, "day1")
    stored = pd.read_parquet(offline / dataset.name / fs.FEATURES_FILE)
    assert stored[category].isna().sum() == 300 and stored[category].notna().sum() == 300


def test_a_single_file_store_is_migrated_by_the_next_ingest(dataset, offline, small_batches):
    # the layout of earlier versions: one file per table holding every batch, a ledger without digests
    folder = offline / dataset.name
    folder.mkdir(parents=True)
    old = [fs._feature_rows(b, dataset, f"day{i}") for i, b in enumerate(small_batches[:2])]
    pd.concat(old, ignore_index=True).to_parquet(folder / fs.FEATURES_FILE, index=False)
    labels = [fs._label_rows(b, dataset, f"day{i}") for i, b in enumerate(small_batches[:2])]
    pd.concat(labels, ignore_index=True).to_parquet(folder / fs.LABELS_FILE, index=False)
    (folder / fs.OLD_LEDGER_FILE).write_text(
        '{"day0": {"feature_rows": 300, "label_rows": 300, "materialized_at": "2026-01-02T00:00:00+00:00"},'
        ' "day1": {"feature_rows": 300, "label_rows": 300}}')
    before = pd.read_parquet(folder / fs.FEATURES_FILE)

    again = fs.ingest_batch(small_batches[1], dataset, offline, "day1")
    assert again.skipped and again.total_feature_rows == 600
    assert (folder / fs.FEATURES_FILE).is_dir()
    pd.testing.assert_frame_equal(pd.read_parquet(folder / fs.FEATURES_FILE), before)
    fs.ingest_batch(small_batches[2], dataset, offline, "day2")
    assert sorted(p.name for p in (folder / fs.LABELS_FILE).iterdir()) == [
        "0000000_legacy.parquet", "0000001_day2.parquet"]
    ledger = fs.ingested_batches(dataset, offline)
    assert ledger["day0"]["materialized_at"] and ledger["day0"]["features_file"] == "0000000_legacy.parquet"
    assert pd.Timestamp(ledger["day1"]["event_max"]) == small_batches[1][dataset.timestamp].max()
    assert len(pd.read_parquet(folder / fs.LABELS_FILE)) == 900
    assert not fs.migrate_offline_store(dataset, offline), "a second migration has nothing to do"
    assert not (folder / fs.OLD_LEDGER_FILE).exists()
