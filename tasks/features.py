"""Feast feature stage as Prefect tasks: render/apply the repo, ingest batches, materialize, point-in-time join."""

from __future__ import annotations

import re
from datetime import datetime
from pathlib import Path

import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE

from flywheel import featurestore
from flywheel.errors import FeatureJoinError, FlywheelError
from flywheel.featurestore import IngestReport, JoinReport, MaterializeReport
from flywheel.schemas import DatasetDefinition
from flywheel.settings import FeaturesConfig, StoresConfig
from flywheel.validation import read_batch
from tasks._prefect import in_run, run_logger


@task(name="render_feature_repo", task_run_name="render-feature-repo", retries=2, retry_delay_seconds=2)
def render_feature_repo(stores: StoresConfig, home: Path) -> Path:
    """Write the concrete Feast repo (feature_store.yaml with absolute paths) for these stores."""
    return featurestore.render_repo(stores, home)


@task(
    name="apply_feature_repo",
    task_run_name="apply-feature-repo-{dataset.name}",
    retries=2,
    retry_delay_seconds=5,
)
def apply_feature_repo(repo: Path, dataset: DatasetDefinition, cfg: FeaturesConfig, offline_dir: Path) -> str:
    """Apply the dataset's versioned feature service (no-op when unchanged); returns the service name."""
    store = featurestore.open_store(repo)
    service = featurestore.apply_definitions(store, dataset, cfg.ttl_days, offline_dir)
    run_logger("flywheel.features").info("feature service %s applied in %s", service, repo)
    return service


def batch_id(path: Path) -> str:
    """A batch's id is its file name without the extension (`batch_2026-01-01.parquet` -> `batch_2026-01-01`)."""
    return re.sub(r"\.(parquet|csv)$", "", Path(path).name)


@task(
    name="ingest_batch",
    task_run_name="ingest-{dataset.name}-{batch.name}",
    cache_policy=NO_CACHE,
    retries=2,
    retry_delay_seconds=5,
)
def ingest_batch(batch: Path, dataset: DatasetDefinition, offline_dir: Path, ingested_at: datetime) -> IngestReport:
    """Append one validated batch file to the offline store (idempotent per file name), stamped `ingested_at`
    (the project clock's time: the volume trigger counts the rows that arrived since the last training)."""
    report = featurestore.ingest_batch(read_batch(batch, dataset), dataset, offline_dir, batch_id(batch),
                                       ingested_at=ingested_at)
    run_logger("flywheel.features").info(
        "%s %s: %d feature rows, %d label rows",
        "skipped (already ingested)" if report.skipped else "ingested", report.batch_id,
        report.feature_rows, report.label_rows,
    )
    return report


@task(
    name="materialize_features",
    task_run_name="materialize-{dataset.name}",
    retries=2,
    retry_delay_seconds=5,
)
def materialize_features(repo: Path, dataset: DatasetDefinition, offline_dir: Path, end: datetime) -> MaterializeReport:
    """Load the online store up to `end` (the project clock's now, or a training's as_of): the full range
    first, incrementally afterwards."""
    store = featurestore.open_store(repo)
    report = featurestore.materialize_online(store, dataset, offline_dir, end)
    run_logger("flywheel.features").info("materialized %s in %.2f s", report.modes, report.seconds)
    return report


@task(
    name="build_training_set",
    task_run_name="training-set-{dataset.name}-{service}",
    cache_policy=NO_CACHE,
    retries=1,
    retry_delay_seconds=5,
)
def build_training_set(
    repo: Path,
    dataset: DatasetDefinition,
    service: str,
    cfg: FeaturesConfig,
    offline_dir: Path,
    as_of: datetime,
) -> pd.DataFrame:
    """Point-in-time training set through a feature service; publishes the join report as an artifact."""
    store = featurestore.open_store(repo)
    try:
        frame, report = featurestore.build_training_set(store, dataset, service, cfg, offline_dir, as_of)
    except FeatureJoinError as exc:
        if exc.report is not None:  # people see the counts of a failed join too
            _publish(exc.report, dataset, service, failed=True)
        raise
    run_logger("flywheel.features").info(
        "training set: %d rows (%d entity rows, %d dropped, %d all-null)",
        report.training_rows, report.entity_rows, report.dropped_rows, report.all_null_rows,
    )
    _publish(report, dataset, service, failed=False)
    return frame


def _publish(report: JoinReport, dataset: DatasetDefinition, service: str, failed: bool) -> None:
    # Outside a flow/task run (unit tests call `.fn`) there is no run to attach an artifact to.
    if not in_run():
        return
    from prefect.artifacts import create_markdown_artifact

    verdict = "**FAILED**: the join lost more than the configured tolerance.\n\n" if failed else ""
    create_markdown_artifact(
        markdown=verdict + report.to_markdown(),
        key=f"training-set-{dataset.name}".replace("_", "-"),
        description=f"point-in-time join report for {dataset.name} through {service}",
    )


@task(name="find_new_batches", task_run_name="find-new-batches-{dataset.name}", retries=2, retry_delay_seconds=2)
def find_new_batches(dataset: DatasetDefinition, source: Path, offline_dir: Path) -> list[Path]:
    """The batch files under the dataset's source that the offline store has not ingested yet."""
    if source.is_file():
        files = [source]
    elif source.is_dir():
        files = sorted(p for p in source.iterdir() if p.suffix.lower() in (".parquet", ".pq", ".csv"))
    else:
        raise FlywheelError(f"dataset {dataset.name!r}: source {source} does not exist")
    done = featurestore.ingested_batches(dataset, offline_dir)
    new = [p for p in files if batch_id(p) not in done]
    run_logger("flywheel.features").info("%d batch file(s) in %s, %d new", len(files), source, len(new))
    return new
