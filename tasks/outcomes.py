"""Outcome tasks: ingest a delayed-label batch; build a training set from the features the service used."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE

from flywheel import outcomes
from flywheel.outcomes import OutcomeIngestReport
from flywheel.schemas import DatasetDefinition
from tasks._prefect import in_run, retry_transient, run_logger


@task(name="ingest_outcomes", task_run_name="ingest-outcomes-{batch.name}", cache_policy=NO_CACHE, retries=2,
      retry_delay_seconds=2, retry_condition_fn=retry_transient)
def ingest_outcomes(batch: Path, dataset: DatasetDefinition, outcomes_url: str, quarantine_dir: Path,
                    ingested_at: datetime) -> OutcomeIngestReport:
    """Validate one outcome batch and store it in flywheel_outcomes (idempotent by content), stamped
    `ingested_at` (the project clock's now). A failing batch is quarantined and DataValidationError names every
    failure (not retried: bad data does not heal)."""
    report = outcomes.ingest_outcome_file(Path(batch), dataset, outcomes_url, quarantine_dir, ingested_at)
    run_logger("flywheel.outcomes").info(
        "%s: %s (batch %s; %d outcomes of %s stored)", Path(batch).name,
        "already stored, nothing added" if report.skipped else f"{report.rows} outcome(s) added",
        report.batch_id[:12], report.total_rows, dataset.name)
    return report


@task(name="build_served_training_set", task_run_name="served-training-set-{dataset.name}", cache_policy=NO_CACHE,
      retries=1, retry_delay_seconds=5, retry_condition_fn=retry_transient)
def build_served_training_set(log_url: str, outcomes_url: str, dataset: DatasetDefinition, model: str,
                              as_of: datetime) -> pd.DataFrame:
    """The training frame from the prediction log's served features joined with their outcomes
    (`training_source: served_features`); the counts become an artifact."""
    frame, report = outcomes.load_served_training_set(log_url, outcomes_url, dataset, model, as_of)
    run_logger("flywheel.outcomes").info(
        "served training set: %d rows (%d predictions, %d snapshots, %d with an outcome)",
        len(frame), report.predictions, report.snapshots, report.with_outcome)
    if in_run():
        from prefect.artifacts import create_markdown_artifact

        create_markdown_artifact(
            key=f"training-set-{dataset.name}".replace("_", "-"),
            description=f"training set of {dataset.name} from served features",
            markdown=("## Training set: served features joined with outcomes\n\n| | |\n|---|---|\n"
                      f"| logged predictions with a snapshot | {report.predictions} |\n"
                      f"| distinct snapshots | {report.snapshots} |\n"
                      f"| with an outcome known at {report.as_of.isoformat()} | {report.with_outcome} |\n"))
    return frame
