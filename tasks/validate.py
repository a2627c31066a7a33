"""Prefect task: validate one incoming batch, quarantine it when it fails."""

from __future__ import annotations

import re
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from flywheel.errors import DataValidationError
from flywheel.schemas import DatasetDefinition
from flywheel.settings import ValidateConfig
from flywheel.validation import ValidationOutcome, quarantine_batch, read_batch, validate_frame
from tasks._prefect import in_run, run_logger


def artifact_key(dataset: DatasetDefinition) -> str:
    """Prefect artifact keys allow only lowercase letters, digits and dashes."""
    return "validation-" + re.sub(r"[^a-z0-9]+", "-", dataset.name.lower()).strip("-")


@task(name="validate_batch", task_run_name="validate-{batch_path.name}", cache_policy=NO_CACHE)
def validate_batch(
    batch_path: Path, dataset: DatasetDefinition, cfg: ValidateConfig, quarantine_dir: Path
) -> ValidationOutcome:
    """Validate one batch file; on failure quarantine it and raise DataValidationError."""
    batch_path = Path(batch_path)
    logger = run_logger("flywheel.validate")
    try:
        df = read_batch(batch_path, dataset)
    except FileNotFoundError:
        raise
    except Exception as exc:  # an unreadable file is a failed batch too: quarantine it, do not crash
        outcome = ValidationOutcome(
            batch=batch_path.name, success=False, row_count=0,
            failures=[{"expectation": "ReadBatch", "column": None, "observed_value": None,
                       "error": f"{type(exc).__name__}: {exc}"}],
        )  # fmt: skip
    else:
        outcome = validate_frame(df, dataset, cfg, batch_name=batch_path.name)

    for alert in outcome.alerts:
        action = "imputed" if alert["column"] in outcome.imputed else "batch fails"
        logger.warning(
            "data-quality alert on %s: %s is %.1f%% missing (threshold %.1f%%), %s",
            outcome.batch, alert["column"], 100 * alert["missing_share"], 100 * alert["threshold"], action,
        )
    # a failed batch stops the run: its details are the artifact. Passed batches are one row each of the run's
    # table (publish_validation_table). Outside a run the artifact call would start a temporary server: skip it
    if in_run() and not outcome.success:
        from prefect.artifacts import create_markdown_artifact

        create_markdown_artifact(
            key=artifact_key(dataset),
            markdown=outcome.summary_markdown(),
            description=f"Data validation of {outcome.batch} ({dataset.name}): FAILED",
        )
    if not outcome.success:
        moved = quarantine_batch(batch_path, quarantine_dir, outcome)
        logger.error("batch %s failed validation; quarantined to %s", outcome.batch, moved)
        raise DataValidationError(outcome.batch, outcome.failures, str(moved))
    logger.info("batch %s passed validation (%d rows)", outcome.batch, outcome.row_count)
    return outcome


def validation_rows(outcomes: list[ValidationOutcome]) -> list[dict[str, object]]:
    """One table row per validated batch."""
    return [{"batch": o.batch, "result": "passed" if o.success else "FAILED", "rows": o.row_count,
             "failed expectations": len(o.failures),
             "data-quality alerts": ", ".join(f"{a['column']} {a['missing_share']:.1%} missing" for a in o.alerts)
             or "-", "imputed": ", ".join(o.imputed) or "-"} for o in outcomes]


@task(name="publish_validation_table", task_run_name="validation-table-{dataset.name}", cache_policy=NO_CACHE)
def publish_validation_table(outcomes: list[ValidationOutcome], dataset: DatasetDefinition) -> None:
    """The run's validated batches as one table artifact (not one card per batch)."""
    if not outcomes or not in_run():
        return
    from prefect.artifacts import create_table_artifact

    rows = sum(o.row_count for o in outcomes)
    alerts = sum(len(o.alerts) for o in outcomes)
    create_table_artifact(table=validation_rows(outcomes), key=artifact_key(dataset),
                          description=f"Data validation ({dataset.name}): {len(outcomes)} batch(es), {rows} rows, "
                                      f"all passed, {alerts} data-quality alert(s)")
