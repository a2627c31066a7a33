"""Batch scoring and skew-check tasks: resolve entities, load the model by alias, score, compare online/offline."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE

from flywheel import featurestore, scoring
from flywheel.errors import RegistryError, SkewError
from flywheel.schemas import DatasetDefinition
from flywheel.scoring import ScoringReport, SkewReport
from flywheel.settings import BatchConfig, ParallelismConfig
from tasks._prefect import in_run, retry_transient, run_logger


def _publish(markdown: str, key: str, description: str) -> None:
    # Outside a flow/task run (unit tests call `.fn`) there is no run to attach an artifact to.
    if not in_run():
        return
    from prefect.artifacts import create_markdown_artifact

    create_markdown_artifact(markdown=markdown, key=key.replace("_", "-").lower(), description=description)


@task(name="resolve_entities", task_run_name="resolve-entities-{dataset.name}")
def resolve_entities(entities: Path | None, dataset: DatasetDefinition, offline_dir: Path, at: datetime) -> pd.Series:
    """The entity ids to score: the given file's, or every entity with offline rows at or before `at`."""
    ids = scoring.read_entities(entities, dataset) if entities else scoring.offline_entities(dataset, offline_dir, at)
    run_logger(__name__).info("%d entities to score (%s)", len(ids), entities or "every entity in the offline store")
    return ids


@task(
    name="load_model_by_alias",
    task_run_name="load-{model_name}@{alias}",
    cache_policy=NO_CACHE,
    retries=2,
    retry_delay_seconds=5,
    retry_condition_fn=retry_transient,
)
def load_model_by_alias(tracking_uri: str, audit_db_url: str, model_name: str, alias: str) -> Any:
    """The digest-verified model version `alias` points to (LoadedModel); RegistryError when none does."""
    from flywheel.audit import AuditLog
    from flywheel.registry import Registry

    registry = Registry(tracking_uri, AuditLog(audit_db_url))
    if registry.alias_version(model_name, alias) is None:
        held = registry.aliases(model_name)
        hint = f"its aliases: {held}" if held else "train and register a model first (flywheel train)"
        raise RegistryError(f"no version of model {model_name!r} holds alias {alias!r}; nothing to score with ({hint})")
    model = registry.load(model_name, alias=alias)
    run_logger(__name__).info("loaded %s v%s (@%s), digests verified", model.name, model.version, alias)
    return model


@task(
    name="score_entities",
    task_run_name="score-{dataset.name}-at-{at:%Y%m%dT%H%M%S}",
    cache_policy=NO_CACHE,
    retries=1,
    retry_delay_seconds=5,
    retry_condition_fn=retry_transient,
)
def score_entities(
    repo: Path, model: Any, dataset: DatasetDefinition, ids: pd.Series, at: datetime, output_dir: Path,
    scored_at: datetime, parallelism: ParallelismConfig | None = None, partition_rows: int = 100_000,
    memory_limit: str | None = None,
) -> ScoringReport:
    """Offline features at `at` through the model's service -> predictions -> parquet (every row stamped
    `scored_at`, the project clock's now); a summary artifact.
    With `parallelism` asking for Dask, the entities are scored in partitions of `partition_rows` on its workers
    (the same rows and scores as the serial path, one file either way). Either way the features come from the
    DuckDB point-in-time join reading only the scored entities' rows (`memory_limit`: its cap, e.g. "2GB");
    the service's views are looked up in Feast's registry here, once, so workers never open the store."""
    from tasks.fanout import partition_fanout

    reader = scoring.offline_reader(featurestore.open_store(repo), scoring.model_feature_service(model),
                                    memory_limit)
    with partition_fanout(parallelism or ParallelismConfig(), reader, model, dataset, at) as fan:
        if fan is None:
            report = scoring.batch_score(reader, model, dataset, ids, at, output_dir, scored_at)
        else:
            report = scoring.batch_score_partitioned(model, dataset, ids, at, output_dir, partition_rows, fan,
                                                      scored_at)
    run_logger(__name__).info(
        "scored %d of %d entities with %s v%s (%d without features; %d offline feature rows read) -> %s",
        report.scored_rows, report.rows, report.model_name, report.model_version, report.no_feature_rows,
        report.feature_rows_read, report.path,
    )
    _publish(report.to_markdown(), f"batch-scoring-{dataset.name}",
             f"batch scoring of {dataset.name} with {report.model_name} v{report.model_version}")
    return report


@task(
    name="check_skew",
    task_run_name="check-skew-{dataset.name}",
    cache_policy=NO_CACHE,
    retries=1,
    retry_delay_seconds=5,
    retry_condition_fn=retry_transient,
)
def check_skew(
    repo: Path,
    model: Any,
    dataset: DatasetDefinition,
    cfg: BatchConfig,
    offline_dir: Path,
    at: datetime | None = None,
    entities: list[Any] | None = None,
    seed: int | None = None,
) -> SkewReport:
    """Online vs offline feature vectors and predictions for `cfg.skew_sample` entities; fails on skew."""
    store = featurestore.open_store(repo)
    key, what = f"skew-check-{dataset.name}", f"training-serving skew check of {dataset.name}"
    try:
        report = scoring.check_skew(
            store, model, dataset, offline_dir, cfg.skew_sample, cfg.skew_tolerance, at, entities, seed
        )
    except SkewError as exc:
        if exc.report is not None:  # people see the mismatches of a failed check
            _publish(exc.report.to_markdown(), key, what)
        raise
    run_logger(__name__).info(report.summary())
    _publish(report.to_markdown(), key, what)
    return report
