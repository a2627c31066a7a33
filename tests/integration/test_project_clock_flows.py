"""The flows take `now` from the project clock (settings `clock`, here a simulated one exported as `flywheel up`
exports it), never from the wall's: a training run uses the labels known by the simulated now and audits its
alias move at it; announced batches and outcomes are stamped with it, so the volume trigger counts what
arrived after the last training on one clock. Real Prefect (the session's harness), Feast, MLflow, SQLite."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd
import pytest
import yaml

from flywheel.clock import ManualClock
from flywheel.datagen import GeneratorSpec, write_batches, write_label_batches
from tests.conftest import make_home

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.usefixtures("prefect_harness")]
SLACK = timedelta(minutes=15)  # a simulated clock at wall speed moves on while the flow runs


def simulated(monkeypatch: pytest.MonkeyPatch, start: datetime, model: str) -> None:
    """The flows' settings: a simulated clock at wall speed standing at `start` now; this test's own model."""
    for key, value in {"FLYWHEEL_CLOCK__KIND": "simulated", "FLYWHEEL_CLOCK__START": start.isoformat(),
                       "FLYWHEEL_CLOCK__SECONDS_PER_DAY": "86400",
                       "FLYWHEEL_CLOCK__ANCHOR": datetime.now(UTC).isoformat(),
                       "FLYWHEEL_REGISTER__MODEL_NAME": model}.items():
        monkeypatch.setenv(key, value)


def test_a_training_run_uses_the_labels_known_by_the_project_clocks_now(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No `as_of` given: the simulated now (months behind the wall's) decides which labels are known, and the
    registration's alias move is audited at it. On the wall's now every label of the data would be known."""
    from mlflow.tracking import MlflowClient

    from flows.training import TrainingParams, training_pipeline
    from flywheel.audit import AuditLog
    from flywheel.runtime import start_run_context

    home = make_home(tmp_path)
    ci = yaml.safe_load((home / "configs" / "ci.yaml").read_text())  # about the clock, not the latency gate
    ci.setdefault("evaluate", {}).setdefault("gate_overrides", {})["latency"] = {"service_budget_ms": 10_000}
    (home / "configs" / "ci.yaml").write_text(yaml.safe_dump(ci))
    spec = GeneratorSpec(seed=7, days=24, rows_per_day=120, customers=1500)
    write_batches(spec, home / "data" / "incoming" / "churn")
    # labels arrive 30 days after their events: known for Jan 1-16 and part of 17 (the holdout takes 7 days)
    sim = datetime(2026, 2, 16, 12, tzinfo=UTC)
    model = f"clock{uuid.uuid4().hex[:8]}"
    simulated(monkeypatch, sim, model)

    result = training_pipeline(TrainingParams(profile="ci", config_dir=str(home / "configs")))
    ctx = start_run_context("ci", home / "configs")
    tags = MlflowClient(ctx.tracking_uri).get_run(result.run_id).data.tags
    as_of = datetime.fromisoformat(tags["flywheel.as_of"])
    assert sim <= as_of < sim + SLACK, f"as_of {as_of}: not the simulated now"

    labels = pd.concat([pd.read_parquet(p) for p in sorted((home / "data" / "incoming" / "churn").iterdir())])
    known = int((pd.to_datetime(labels["label_available_at"], utc=True) <= as_of).sum())
    assert 0 < known < len(labels), "the simulated now splits the labels into known and not yet known"
    assert 0 < int(tags["flywheel.training_rows"]) <= known, "no label unknown at the simulated now was used"

    assert result.outcome == "champion", result
    (move,) = AuditLog(ctx.audit_db_url).entries(model)
    assert sim <= move.at < sim + SLACK, f"the alias move at {move.at}: not on the simulated clock"


def test_the_volume_trigger_counts_landed_rows_after_the_last_training_on_the_project_clock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The last training (an alias move, audited on the project clock) is a day before the simulated now, years
    after the wall's: a batch and an outcome batch landing now are counted, since they are stamped now on the
    same clock (stamped on the wall's, they would predate the training and count for nothing)."""
    from flows.ingestion import LandedParams, data_landed, labels_landed
    from flywheel.audit import AuditLog
    from flywheel.featurestore import ingested_batches
    from flywheel.runtime import start_run_context

    home = make_home(tmp_path)
    spec = GeneratorSpec(seed=11, days=1, rows_per_day=120, customers=300)
    (batch,) = write_batches(spec, home / "data" / "incoming" / "churn")
    (labels,) = write_label_batches(spec, home / "data" / "incoming" / "churn_labels")
    sim = datetime(2031, 3, 1, tzinfo=UTC)
    model = f"clock{uuid.uuid4().hex[:8]}"
    simulated(monkeypatch, sim, model)
    ctx = start_run_context("ci", home / "configs")
    AuditLog(ctx.audit_db_url, ManualClock(sim - timedelta(days=1))).append(model, "champion", None, "1",
                                                                            "the last training", "test")
    params = {"profile": "ci", "config_dir": str(home / "configs")}

    landed = data_landed(LandedParams(batch=str(batch), **params))
    stamp = datetime.fromisoformat(ingested_batches(ctx.dataset, ctx.offline_dir)[batch.stem]["ingested_at"])
    assert sim <= stamp < sim + SLACK, f"ingested_at {stamp}: not on the simulated clock"
    assert landed.new_labelled_rows == 120 and "too few rows" in landed.decision, landed

    outcomes = labels_landed(LandedParams(batch=str(labels), **params))
    assert outcomes.rows == 120 and outcomes.new_labelled_rows == 240, outcomes

    # a training after them (on the same clock): nothing landed since
    AuditLog(ctx.audit_db_url, ManualClock(sim + timedelta(days=1))).append(model, "challenger", None, "2",
                                                                            "a later training", "test")
    again = labels_landed(LandedParams(batch=str(labels), **params))
    assert again.skipped and again.new_labelled_rows == 0, again
