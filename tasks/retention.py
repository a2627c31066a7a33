"""Retention as Prefect tasks: the cut-offs, the deletes, the offline compaction, the run's summary."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from flywheel import featurestore, retention
from flywheel.compaction import CompactionReport
from flywheel.retention import Cutoff, Purge
from flywheel.schemas import DatasetDefinition
from tasks._prefect import in_run, retry_transient, run_logger


@task(name="retention_floor", task_run_name="retention-floor-{dataset.name}", cache_policy=NO_CACHE)
def retention_floor(policy_file: Path, dataset: DatasetDefinition) -> timedelta:
    """How far back the loop still reads served rows and windows: the monitoring policy's performance lookback
    (realized figures join windows that old to late outcomes)."""
    from flywheel.monitoring.config import load_policy

    return load_policy(policy_file).for_dataset(dataset.name).performance.lookback


@task(name="purge_prediction_log", task_run_name="purge-prediction-log", cache_policy=NO_CACHE,
      retries=2, retry_delay_seconds=5, retry_condition_fn=retry_transient)
def purge_prediction_log(url: str, cut: Cutoff) -> list[Purge]:
    """Delete served predictions (and scoring errors) older than the cut-off."""
    out = retention.purge_prediction_log(url, cut.before)
    run_logger("flywheel.retention").info("prediction log: %s (kept %.0f days%s)",
                                          ", ".join(f"{p.table} -{p.deleted} ({p.kept} kept)" for p in out), cut.days,
                                          " = the performance lookback" if cut.raised else "")
    return out


@task(name="purge_monitoring_history", task_run_name="purge-monitoring-history", cache_policy=NO_CACHE,
      retries=2, retry_delay_seconds=5, retry_condition_fn=retry_transient)
def purge_monitoring_history(url: str, cut: Cutoff) -> list[Purge]:
    """Delete judged windows (and their realized figures) that ended before the cut-off."""
    out = retention.purge_monitoring_history(url, cut.before)
    run_logger("flywheel.retention").info("monitoring history: %s",
                                          ", ".join(f"{p.table} -{p.deleted} ({p.kept} kept)" for p in out))
    return out


@task(name="compact_offline_store", task_run_name="compact-offline-store-{dataset.name}", cache_policy=NO_CACHE,
      retries=2, retry_delay_seconds=5, retry_condition_fn=retry_transient)
def compact_offline_store(dataset: DatasetDefinition, offline_dir: Path, before: datetime) -> CompactionReport:
    """Merge each finished month's per-batch part files into one file per table (same rows)."""
    report = featurestore.compact_offline_store(dataset, offline_dir, before)
    run_logger("flywheel.retention").info("offline store %s: %d month(s) compacted, %d -> %d part files",
                                          dataset.name, len(report.months), report.files_before, report.files_after)
    return report


@task(name="publish_retention_summary", task_run_name="publish-retention-summary", cache_policy=NO_CACHE)
def publish_retention_summary(markdown: str) -> None:
    """The run's table as a Prefect artifact (a failure to publish does not undo the work)."""
    if in_run():
        from prefect.artifacts import create_markdown_artifact

        try:
            create_markdown_artifact(markdown=markdown, key="retention", description="retention and compaction")
        except Exception as exc:
            run_logger("flywheel.retention").warning("could not publish the retention summary: %s", exc)
