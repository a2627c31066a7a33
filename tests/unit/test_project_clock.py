"""The project's own logic reads the project clock handed down from its entry point, never the wall's: alias
moves are audited on it, the champion's registration (staleness) and the last training (volume) are read
from those moves, batches and outcomes are stamped with it when they are ingested, so the volume trigger
compares times of one clock. A simulated clock years from the wall's makes any wall-time stamp show."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd
from typer.testing import CliRunner

from flywheel.clock import ManualClock
from flywheel.datagen import GeneratorSpec, generate, write_label_batches
from tests.conftest import outcome_batch_stamp

SIM = datetime(2031, 3, 1, tzinfo=UTC)  # far from any wall time these tests run at
SPEC = GeneratorSpec(seed=3, days=1, rows_per_day=40, customers=100)


def simulated_env(start: datetime = SIM) -> dict[str, str]:
    """A simulated clock at wall speed that stood at `start` a moment ago (what `flywheel up` exports)."""
    return {"FLYWHEEL_CLOCK__KIND": "simulated", "FLYWHEEL_CLOCK__START": start.isoformat(),
            "FLYWHEEL_CLOCK__SECONDS_PER_DAY": "86400", "FLYWHEEL_CLOCK__ANCHOR": datetime.now(UTC).isoformat()}


def near(at: datetime, expected: datetime, slack: timedelta = timedelta(minutes=10)) -> bool:
    at = at if at.tzinfo else at.replace(tzinfo=UTC)
    return expected <= at < expected + slack


def test_alias_moves_are_audited_on_the_clock_the_entry_point_hands_down(tmp_path: Path) -> None:
    from flywheel.audit import AuditLog

    url = f"sqlite:///{tmp_path}/flywheel.db"
    entry = AuditLog(url, ManualClock(SIM)).append("churn", "champion", None, "1", "first", "test")
    assert entry.at == SIM and AuditLog(url).entries("churn")[0].at == SIM
    before = datetime.now(UTC) - timedelta(seconds=1)
    wall = AuditLog(url).append("churn", "challenger", None, "2", "no clock given", "test")
    assert before <= wall.at <= datetime.now(UTC), "without a clock: the wall's, as before"


def test_the_champions_registration_is_read_on_the_project_clock(tmp_path: Path) -> None:
    """Staleness counts the champion's age from its first alias move, on the clock `now` is on (no MLflow:
    the tracking URI is never read while the audit log has the version)."""
    from flywheel.audit import AuditLog
    from tasks.triggers import read_champion_state

    url = f"sqlite:///{tmp_path}/flywheel.db"
    audit = AuditLog(url, ManualClock(SIM))
    audit.append("churn", "challenger", None, "1", "registered", "test")
    audit.append("churn", "champion", None, "1", "promoted", "test", at=SIM + timedelta(days=1))
    state = read_champion_state.fn("file:///nowhere", url, "churn", "churn", "1", SIM + timedelta(days=40))
    assert state.registered_at == SIM


def test_the_volume_trigger_counts_what_was_ingested_after_the_last_training_on_one_clock(tmp_path: Path) -> None:
    from flywheel.audit import AuditLog
    from flywheel.featurestore import ingest_batch
    from flywheel.outcomes import OutcomeStore, outcome_rows
    from flywheel.schemas import load_dataset
    from tasks.landing import count_new_labelled_rows, last_training_at

    url, offline = f"sqlite:///{tmp_path}/flywheel.db", tmp_path / "offline"
    ds = load_dataset(Path(__file__).parents[2] / "configs" / "datasets" / "churn.yaml")
    AuditLog(url, ManualClock(SIM)).append("churn", "champion", None, "1", "trained", "test")
    trained = last_training_at.fn(url, "churn")
    assert trained == SIM

    (_, early), (_, late) = generate(GeneratorSpec(seed=3, days=2, rows_per_day=40, customers=100))
    ingest_batch(early, ds, offline, "early", ingested_at=SIM - timedelta(hours=1))  # before the training
    ingest_batch(late, ds, offline, "late", ingested_at=SIM + timedelta(hours=1))
    (labels,) = write_label_batches(SPEC, tmp_path / "labels")
    store = OutcomeStore(url)
    try:
        store.ingest(outcome_rows(pd.read_parquet(labels), ds), ds, "labels", ingested_at=SIM + timedelta(hours=2))
    finally:
        store.close()
    assert count_new_labelled_rows.fn(ds, offline, url, trained) == 40 + 40, "the late batch and the outcomes"
    assert count_new_labelled_rows.fn(ds, offline, url, SIM + timedelta(days=1)) == 0


def test_flywheel_outcomes_ingest_stamps_the_batch_on_the_project_clock(home: Path) -> None:
    from flywheel.cli import app

    (labels,) = write_label_batches(SPEC, home / "labels")
    res = CliRunner().invoke(app, ["outcomes", "ingest", str(labels), "--profile", "ci", "--config-dir",
                                   str(home / "configs")], env=simulated_env())
    assert res.exit_code == 0, res.output
    stamp = outcome_batch_stamp(f"sqlite:///{home}/data/flywheel.db")
    assert near(stamp, SIM), f"ingested_at {stamp}: not on the simulated clock"
