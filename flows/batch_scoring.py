"""Batch (offline) scoring: the model an alias points to, applied to point-in-time features of many entities.

entities -> model by alias (digest-verified) -> offline features at `at` through the model's own feature
service -> predictions -> `<batch.output_dir>/<model>/v<version>/<at>.parquet` + a summary artifact;
optionally the training-serving skew check (online vs offline vectors and predictions).
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from prefect import flow, get_run_logger
from pydantic import BaseModel, Field, field_validator

from tasks.features import render_feature_repo
from tasks.score import check_skew, load_model_by_alias, resolve_entities, score_entities


class BatchScoringParams(BaseModel):
    """What the Prefect UI shows as the run form."""

    entities: str | None = Field(
        None, description="Parquet/CSV file with the entity id column (default: every entity in the offline store)"
    )
    at: datetime | None = Field(None, description="Score with the features known at this time, tz-aware "
                                                  "(default: the project clock's now)")
    alias: str = Field("champion", min_length=1, description="Registry alias of the model to score with")
    model_name: str | None = Field(None, description="Registered model (default: register.model_name or the dataset)")
    skew_check: bool = Field(
        False,
        description="Also compare online and offline features (and predictions) for a sample of entities, "
        "offline at the time the online store was loaded up to; fails the run on skew",
    )
    dataset: str | None = Field(None, description="Dataset definition YAML (default: the settings' dataset)")
    profile: Literal["local", "ci", "production"] | None = Field(None, description="Settings profile")
    config_dir: str | None = Field(None, description="Folder holding base.yaml (default: ./configs)")

    @field_validator("at")
    @classmethod
    def _tz_aware(cls, value: datetime | None) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("at must include a timezone, e.g. 2026-03-01T00:00:00Z")
        return value


class BatchScoringResult(BaseModel):
    model_name: str
    model_version: str
    feature_service: str
    feature_time: datetime
    path: str
    rows: int
    scored_rows: int
    no_feature_rows: int
    skew_passed: bool | None = None  # None: not checked


@flow(name="batch-scoring", log_prints=True)
def batch_scoring(params: BatchScoringParams | None = None) -> BatchScoringResult:
    """Score entities offline with the aliased model: one parquet file per model version and feature time."""
    from flywheel.runtime import start_run_context

    params = params or BatchScoringParams()
    ctx = start_run_context(params.profile, params.config_dir, params.dataset)
    settings, dataset = ctx.settings, ctx.dataset
    now = ctx.clock.now()  # the project clock's: the default feature time, and every row's scored_at
    at = (params.at or now).astimezone(UTC)  # fixed once: the file name and every row carry it
    model_name = params.model_name or ctx.model_name

    # bad input fails before the model is downloaded or anything is written
    ids = resolve_entities(Path(params.entities) if params.entities else None, dataset, ctx.offline_dir, at)
    model = load_model_by_alias(ctx.tracking_uri, ctx.audit_db_url, model_name, params.alias)
    repo = render_feature_repo(settings.stores, settings.paths.home)
    report = score_entities(repo, model, dataset, ids, at, settings.resolve(settings.batch.output_dir), now,
                            settings.batch.parallelism, settings.batch.partition_rows,
                            settings.features.join_memory_limit)
    if report.no_feature_rows:
        get_run_logger().warning(
            "%d of %d entities had no features at %s: written with a null score", report.no_feature_rows,
            report.rows, at.isoformat(),
        )

    skew_passed = None
    if params.skew_check:
        check_skew(repo, model, dataset, settings.batch, ctx.offline_dir)  # raises SkewError on skew
        skew_passed = True
    return BatchScoringResult(
        model_name=report.model_name, model_version=report.model_version, feature_service=report.feature_service,
        feature_time=report.feature_time, path=report.path, rows=report.rows, scored_rows=report.scored_rows,
        no_feature_rows=report.no_feature_rows, skew_passed=skew_passed,
    )
