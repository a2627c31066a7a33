"""Offline ingest of the Feast stage: pure file work (no Feast import), on the small churn batches."""

from __future__ import annotations

import multiprocessing
import os
import sys
from pathlib import Path

import pandas as pd
import pytest

from flywheel import featurestore as fs
from flywheel.errors import FlywheelError
from flywheel.ledger import INDEX_FILE, LedgerIndex


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


def _crash_while_ingesting(batch, dataset, offline: Path, batch_id: str, where: str, calls: int = 1) -> None:
    """Ingest in a forked process that dies (os._exit: no cleanup, no unwinding, the lock freed by the kernel, as
    under SIGKILL) on the `calls`-th call of `where`, a step of the write in flywheel.featurestore or the index."""
    from flywheel import ledger

    owner, name = (ledger.LedgerIndex, "sync") if where == "index.sync" else (fs, where)

    def child() -> None:
        real, seen = getattr(owner, name), []

        def dying(*args, **kwargs):
            seen.append(1)
            if len(seen) == calls:
                os._exit(17)
            return real(*args, **kwargs)

        setattr(owner, name, dying)
        fs.ingest_batch(batch, dataset, offline, batch_id)
        os._exit(0)

    proc = multiprocessing.get_context("fork").Process(target=child)
    proc.start()
    proc.join(120)
    assert proc.exitcode == 17, f"the writer was to die in {where}, exit code {proc.exitcode}"


def part_names(offline: Path, dataset, table: str = fs.FEATURES_FILE) -> list[str]:
    return sorted(p.name for p in (offline / dataset.name / table).iterdir())


def test_a_writer_that_died_before_its_ledger_record_leaves_nothing_visible(dataset, offline, small_batches):
    fs.ingest_batch(small_batches[0], dataset, offline, "day0")
    _crash_while_ingesting(small_batches[1], dataset, offline, "day1", "_append_ledger")
    folder = offline / dataset.name
    # both parts were written, staged beside the tables: readers see the committed batch only
    assert sorted(p.name for p in folder.glob(".*.tmp")) == [
        ".features.parquet.0000002_day1.parquet.tmp", ".labels.parquet.0000002_day1.parquet.tmp"]
    assert part_names(offline, dataset) == part_names(offline, dataset, fs.LABELS_FILE) == ["0000001_day0.parquet"]
    assert set(pd.read_parquet(folder / fs.FEATURES_FILE)[fs.BATCH_COLUMN]) == {"day0"}
    assert list(fs.ingested_batches(dataset, offline)) == ["day0"]

    again = fs.ingest_batch(small_batches[1], dataset, offline, "day1")  # not a duplicate: it was never committed
    assert not again.skipped and again.total_feature_rows == 600
    assert not list(folder.glob(".*.tmp"))
    assert part_names(offline, dataset) == ["0000001_day0.parquet", "0000002_day1.parquet"]
    assert pd.read_parquet(folder / fs.LABELS_FILE)[fs.BATCH_COLUMN].value_counts().to_dict() == {
        "day0": 300, "day1": 300}


@pytest.mark.parametrize("calls", [1, 2], ids=["before-publishing", "between-the-two-tables"])
def test_a_writer_that_died_after_its_ledger_record_is_published_by_the_next(dataset, offline, small_batches, calls):
    fs.ingest_batch(small_batches[0], dataset, offline, "day0")
    _crash_while_ingesting(small_batches[1], dataset, offline, "day1", "_publish_part", calls)
    folder = offline / dataset.name
    assert list(fs.ingested_batches(dataset, offline)) == ["day0", "day1"], "the record is the commit"
    features = pd.read_parquet(folder / fs.FEATURES_FILE)[fs.BATCH_COLUMN]
    assert set(features) == ({"day0"} if calls == 1 else {"day0", "day1"})

    report = fs.ingest_batch(small_batches[2], dataset, offline, "day2")  # the next writer publishes day1 first
    assert (report.skipped, report.total_feature_rows) == (False, 900)
    assert not list(folder.glob(".*.tmp"))
    for table in (fs.FEATURES_FILE, fs.LABELS_FILE):
        assert part_names(offline, dataset, table) == [
            "0000001_day0.parquet", "0000002_day1.parquet", "0000003_day2.parquet"]
        assert pd.read_parquet(folder / table)[fs.BATCH_COLUMN].value_counts().to_dict() == {
            "day0": 300, "day1": 300, "day2": 300}
    assert fs.ingest_batch(small_batches[1], dataset, offline, "day1").skipped


def test_a_writer_that_died_before_updating_the_index_is_caught_up_from_the_ledger(dataset, offline, small_batches):
    fs.ingest_batch(small_batches[0], dataset, offline, "day0")
    _crash_while_ingesting(small_batches[1], dataset, offline, "day1", "index.sync", calls=2)  # after publishing
    assert part_names(offline, dataset) == ["0000001_day0.parquet", "0000002_day1.parquet"]

    # the index missed day1's record: the next writer reads it (and only it) from the ledger
    twin = fs.ingest_batch(small_batches[1], dataset, offline, "day1-copy")
    assert (twin.skipped, twin.duplicate_of, twin.total_feature_rows) == (True, "day1", 600)
    assert twin.ledger_records_read == 2, "day1's record, then its own"
    nxt = fs.ingest_batch(small_batches[2], dataset, offline, "day2")
    assert part_names(offline, dataset)[-1] == "0000003_day2.parquet" and nxt.total_feature_rows == 900


def test_an_ingest_reads_neither_other_batches_records_nor_the_part_folders(dataset, offline, small_batches):
    """At any history the ingest reads one ledger record (its own) and lists no table folder."""
    folder = offline / dataset.name
    tables = {str(folder / fs.FEATURES_FILE), str(folder / fs.LABELS_FILE)}
    listed: list[str] = []
    watching = [False]

    def audit(event: str, args: tuple) -> None:  # the interpreter's own record of directory listings
        if watching[0] and event in ("os.scandir", "os.listdir", "glob.glob") and args and \
                any(str(args[0]).startswith(t) for t in tables):
            listed.append(f"{event} {args[0]}")

    sys.addaudithook(audit)  # cannot be removed: it does nothing once `watching` is off
    tiny = small_batches[0].head(10)

    def batch(i: int) -> pd.DataFrame:
        return tiny.assign(**{c: tiny[c] + pd.Timedelta(days=i) for c in
                              {dataset.timestamp, dataset.created_timestamp, dataset.label_timestamp} - {None}})

    reads = {}
    try:
        for i in range(60):
            if i in (2, 59):
                watching[0] = True
            report = fs.ingest_batch(batch(i), dataset, offline, f"b{i}")
            watching[0] = False
            reads[i] = report.ledger_records_read
            assert not report.skipped and report.total_feature_rows == 10 * (i + 1)
    finally:
        watching[0] = False
    assert reads[2] == reads[59] == 1, reads
    assert listed == []
    # duplicates are still found at that history, by id and by content, reading nothing else
    again, twin = fs.ingest_batch(batch(3), dataset, offline, "b3"), fs.ingest_batch(batch(3), dataset, offline, "x")
    assert again.skipped and (twin.skipped, twin.duplicate_of, twin.ledger_records_read) == (True, "b3", 1)
    with pytest.raises(FlywheelError, match="different rows"):
        fs.ingest_batch(batch(4), dataset, offline, "b3")
    # a load's records appended in between are read once by the next ingest, then not again
    fs._mark_materialized(folder, {"b0", "b1", "b2"})
    assert fs.ingest_batch(batch(60), dataset, offline, "b60").ledger_records_read == 3 + 1
    assert fs.ingest_batch(batch(61), dataset, offline, "b61").ledger_records_read == 1


def test_a_folder_from_before_the_index_is_indexed_and_swept_on_first_touch(dataset, offline, small_batches):
    """An append-only ledger folder written by the previous version (no index), with what that version's crash
    left: a published part no record names, a temp file, the torn start of a record."""
    for i in range(3):
        fs.ingest_batch(small_batches[i], dataset, offline, f"day{i}")
    folder = offline / dataset.name
    ledger_lines = (folder / fs.LEDGER_FILE).read_text()
    LedgerIndex.drop(folder)  # the previous version kept only the ledger
    assert not (folder / INDEX_FILE).exists()
    parts = folder / fs.FEATURES_FILE
    (parts / "0000004_lost.parquet").write_bytes((parts / "0000001_day0.parquet").read_bytes())
    (folder / ".features.parquet.0000004_lost.parquet.99.tmp").write_bytes(b"half")
    with open(folder / fs.LEDGER_FILE, "a") as fh:
        fh.write('{"batch": "lost", "feature_rows": 30')
    assert list(fs.ingested_batches(dataset, offline)) == ["day0", "day1", "day2"], "a torn record is not committed"

    report = fs.ingest_batch(small_batches[3], dataset, offline, "day3")
    assert report.ledger_records_read == 3 + 1, "the whole ledger once, to build the index, then its own record"
    assert (folder / INDEX_FILE).exists()
    assert (folder / fs.LEDGER_FILE).read_text().startswith(ledger_lines), "the records were kept as they were"
    assert not list(folder.glob(".*.tmp"))
    assert part_names(offline, dataset) == [f"000000{i + 1}_day{i}.parquet" for i in range(4)]
    assert pd.read_parquet(parts)[fs.BATCH_COLUMN].value_counts().to_dict() == {f"day{i}": 300 for i in range(4)}
    assert list(fs.ingested_batches(dataset, offline)) == ["day0", "day1", "day2", "day3"]
    assert report.total_feature_rows == report.total_label_rows == 1200
    # the migrated index knows the history: duplicates by id and by content, the refusal of changed rows
    assert fs.ingest_batch(small_batches[1], dataset, offline, "day1").skipped
    assert fs.ingest_batch(small_batches[1], dataset, offline, "day1-again").duplicate_of == "day1"
    with pytest.raises(FlywheelError, match="different rows"):
        fs.ingest_batch(small_batches[4], dataset, offline, "day0")
    assert not fs.migrate_offline_store(dataset, offline), "a second touch has nothing to migrate"


def test_an_unreadable_index_is_rebuilt_from_the_ledger(dataset, offline, small_batches):
    fs.ingest_batch(small_batches[0], dataset, offline, "day0")
    folder = offline / dataset.name
    (folder / INDEX_FILE).write_bytes(b"not a database, whatever an OS crash left" * 100)
    assert fs.ingest_batch(small_batches[0], dataset, offline, "day0").skipped
    report = fs.ingest_batch(small_batches[1], dataset, offline, "day1")
    assert part_names(offline, dataset) == ["0000001_day0.parquet", "0000002_day1.parquet"]
    assert report.total_feature_rows == 600


def test_a_rewritten_ledger_rebuilds_the_index(dataset, offline, small_batches):
    """The index follows the ledger, not the other way round: a ledger replaced under it (compaction folds it)
    is read whole once, and what it says wins."""
    for i in range(2):
        fs.ingest_batch(small_batches[i], dataset, offline, f"day{i}")
    folder = offline / dataset.name
    from flywheel.ledger import write_ledger

    write_ledger(folder, fs.ingested_batches(dataset, offline))  # same records, one line each, a new file
    report = fs.ingest_batch(small_batches[2], dataset, offline, "day2")
    assert report.ledger_records_read == 2 + 1 and report.total_feature_rows == 900
    assert fs.ingest_batch(small_batches[3], dataset, offline, "day3").ledger_records_read == 1


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
