"""Outcome batches end to end through the real entry points: `flywheel data generate --labels`, then
`flywheel outcomes ingest` and the `ingest_outcomes` Prefect task into the project database (SQLite), a
bad batch quarantined. (The join against real service traffic: tests/integration/test_rollout_flow.py.)"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from flywheel.cli import app
from tests.conftest import outcome_batch_stamp

pytestmark = [pytest.mark.integration]
runner = CliRunner()


def _args(home: Path) -> list[str]:
    return ["--profile", "ci", "--config-dir", str(home / "configs")]


def _count(home: Path, table: str = "flywheel_outcomes") -> int:
    engine = sa.create_engine(f"sqlite:///{home}/data/flywheel.db")
    try:
        with engine.connect() as conn:
            return int(conn.execute(sa.text(f"SELECT count(*) FROM {table}")).scalar_one())
    finally:
        engine.dispose()


def test_generate_labels_then_ingest_them_once_and_quarantine_a_bad_batch(home: Path) -> None:
    res = runner.invoke(app, ["data", "generate", "--days", "3", "--rows-per-day", "60", "--seed", "5", "--labels",
                              *_args(home)])
    assert res.exit_code == 0, res.output
    features = sorted((home / "data" / "incoming" / "churn").iterdir())
    labels = sorted((home / "data" / "incoming" / "churn_labels").iterdir())
    assert [p.name for p in features] == [f"batch_2026-01-0{d}.parquet" for d in (1, 2, 3)]
    assert [p.name for p in labels] == ["labels_2026-01-31.parquet", "labels_2026-02-01.parquet",
                                        "labels_2026-02-02.parquet"], "the dataset's outcomes.source, by arrival day"
    assert "wrote 3 outcome batch(es)" in res.output

    res = runner.invoke(app, ["outcomes", "ingest", *map(str, labels), *_args(home)])
    assert res.exit_code == 0, res.output
    assert res.output.count("60 outcome(s) stored") == 3 and "180 in total" in res.output
    assert _count(home) == 180 and _count(home, "flywheel_outcome_batches") == 3

    # the same content again (another name, another format, another row order) adds nothing
    copy = home / "relabelled.csv"
    pd.read_parquet(labels[0]).iloc[::-1].to_csv(copy, index=False)
    res = runner.invoke(app, ["outcomes", "ingest", str(copy), *_args(home)])
    assert res.exit_code == 0 and "already stored, nothing added" in res.output, res.output
    assert _count(home) == 180

    # an outcome that claims to have arrived before its snapshot: exit 2 naming it, the file quarantined
    bad = home / "labels_bad.parquet"
    frame = pd.read_parquet(labels[1])
    frame.loc[0, "label_available_at"] = frame.loc[0, "event_timestamp"] - pd.Timedelta(days=1)
    frame.to_parquet(bad)
    res = runner.invoke(app, ["outcomes", "ingest", str(bad), *_args(home)])
    assert res.exit_code == 2, res.output
    assert "ExpectOutcomeNotToArriveBeforeItsSnapshot(label_available_at)" in res.output
    quarantined = home / "data" / "quarantine" / "labels_bad.parquet"
    assert not bad.exists() and quarantined.is_file()
    report = json.loads((quarantined.parent / "labels_bad.parquet.validation.json").read_text())
    assert report["failures"][0]["unexpected_count"] == 1
    assert _count(home) == 180, "nothing of the bad batch stored"


def test_ingest_without_an_outcomes_section_fails_clearly(home: Path) -> None:
    plain = home / "configs" / "datasets" / "plain.yaml"
    text = (home / "configs" / "datasets" / "churn.yaml").read_text()
    plain.write_text(text.split("outcomes:")[0] + "features:" + text.split("\nfeatures:")[1])
    some = home / "labels.parquet"
    pd.DataFrame({"customer_id": [1]}).to_parquet(some)
    res = runner.invoke(app, ["outcomes", "ingest", str(some), "--dataset", str(plain), *_args(home)])
    assert res.exit_code == 2 and "declares no `outcomes:` section" in res.output, res.output
    assert some.exists(), "not a data problem: the file stays where it is"


def test_ingest_outcomes_task_stores_a_batch(home: Path, prefect_harness: None) -> None:
    from flywheel.datagen import GeneratorSpec, write_label_batches
    from flywheel.schemas import load_dataset
    from tasks.outcomes import ingest_outcomes

    ds = load_dataset(home / "configs" / "datasets" / "churn.yaml")
    (path,) = write_label_batches(GeneratorSpec(seed=2, days=1, rows_per_day=25, customers=50), home / "in")
    url = f"sqlite:///{home}/data/flywheel.db"
    at = datetime(2031, 3, 1, tzinfo=UTC)  # the project clock's now, far from the wall's
    report = ingest_outcomes(path, ds, url, home / "data" / "quarantine", at)
    assert (report.skipped, report.rows, report.total_rows) == (False, 25, 25)
    assert ingest_outcomes(path, ds, url, home / "data" / "quarantine", at).skipped
    assert outcome_batch_stamp(url) == at, "the batch is stamped with the time given"
