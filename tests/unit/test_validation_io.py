"""Reading batches, the outcome report and quarantine: no Great Expectations involved."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from flywheel.schemas import DatasetDefinition
from flywheel.validation import ValidationOutcome, quarantine_batch, read_batch


def failed_outcome(batch: str = "batch_2026-01-01.parquet") -> ValidationOutcome:
    return ValidationOutcome(
        batch=batch,
        success=False,
        row_count=300,
        failures=[
            {"expectation": "ExpectColumnToExist", "column": "tenure_months", "observed_value": None},
            {
                "expectation": "ExpectColumnValuesToBeBetween",
                "column": "num_products",
                "unexpected_count": 3,
                "unexpected_percent": 1.0,
                "sample_values": [-999.0, -999.0, "a|b"],
            },
        ],
        alerts=[{"column": "avg_session_minutes", "missing_share": 0.5, "threshold": 0.3}],
    )


def test_csv_timestamps_are_parsed_as_utc(tmp_path: Path, small_batches: list[pd.DataFrame], dataset):
    path = tmp_path / "b.csv"
    small_batches[0].to_csv(path, index=False)
    df = read_batch(path, dataset)
    for col in ("event_timestamp", "ingested_at", "label_available_at"):
        assert str(df[col].dtype) == "datetime64[ns, UTC]", col
    pd.testing.assert_series_equal(df["event_timestamp"], small_batches[0]["event_timestamp"], check_dtype=False)


def test_csv_unparseable_timestamps_stay_text(tmp_path: Path, dataset):
    path = tmp_path / "b.csv"
    path.write_text("customer_id,event_timestamp\n1,yesterday\n")
    assert read_batch(path, dataset)["event_timestamp"].tolist() == ["yesterday"]


def test_string_entities_keep_leading_zeros(tmp_path: Path, dataset: DatasetDefinition):
    ds = dataset.model_copy(update={"entity_type": "string"})
    path = tmp_path / "b.txt"  # no telling suffix: the explicit format wins
    path.write_text("customer_id,event_timestamp\n007,2026-01-01T00:00:00Z\n")
    df = read_batch(path, ds, fmt="csv")
    assert df["customer_id"].tolist() == ["007"]
    assert df["event_timestamp"].iloc[0] == pd.Timestamp("2026-01-01", tz="UTC")


def test_parquet_roundtrip(tmp_path: Path, small_batches, dataset):
    path = tmp_path / "b.parquet"
    small_batches[1].to_parquet(path, index=False)
    pd.testing.assert_frame_equal(read_batch(path, dataset), small_batches[1])


def test_quarantine_moves_file_and_writes_report(tmp_path: Path):
    src = tmp_path / "incoming" / "batch_2026-01-01.parquet"
    src.parent.mkdir()
    src.write_bytes(b"payload")
    moved = quarantine_batch(src, tmp_path / "quarantine", failed_outcome())
    assert moved == tmp_path / "quarantine" / "batch_2026-01-01.parquet"
    assert not src.exists() and moved.read_bytes() == b"payload"
    report = json.loads((moved.parent / "batch_2026-01-01.parquet.validation.json").read_text())
    assert report["success"] is False and report["source"] == str(src)
    assert report["failures"][0]["column"] == "tenure_months"
    assert ValidationOutcome.model_validate({k: report[k] for k in ValidationOutcome.model_fields}) == failed_outcome()


def test_second_quarantine_of_same_name_does_not_overwrite(tmp_path: Path):
    quarantine = tmp_path / "quarantine"
    paths = []
    for payload in (b"first", b"second", b"third"):
        src = tmp_path / "batch.csv"
        src.write_bytes(payload)
        paths.append(quarantine_batch(src, quarantine, failed_outcome("batch.csv")))
    assert [p.name for p in paths] == ["batch.csv", "batch__1.csv", "batch__2.csv"]
    assert [p.read_bytes() for p in paths] == [b"first", b"second", b"third"]
    assert all((quarantine / f"{p.name}.validation.json").is_file() for p in paths)
    assert len(list(quarantine.iterdir())) == 6


def test_summary_markdown_lists_failures_and_alerts():
    md = failed_outcome().summary_markdown()
    assert "**FAILED**" in md
    assert "| ExpectColumnToExist | tenure_months |" in md
    assert "| ExpectColumnValuesToBeBetween | num_products |" in md and "3 (1.00%)" in md
    assert "a\\|b" in md  # a pipe inside a value does not break the table
    assert "| avg_session_minutes | 50.00% | 30.00% | batch fails |" in md
    ok = ValidationOutcome(batch="b", success=True, row_count=10).summary_markdown()
    assert "**PASSED**" in ok and "Failed expectations" not in ok
