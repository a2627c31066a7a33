"""The training pipeline: validate -> features -> train -> evaluate -> register, as one Prefect flow.

It reads as a story; every step is a task in tasks/. A candidate that fails its gates ends the run in
a named `Rejected` state (visible in the Prefect UI), still registered with its gate report.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from prefect import flow, get_run_logger
from prefect.states import Completed, State
from pydantic import BaseModel, Field, field_validator

from flywheel.errors import FlywheelError
from flywheel.lineage import TAG_TRAINING_SOURCE
from flywheel.runsummary import RunSummary, mlflow_run_url, mlflow_version_url
from flywheel.schemas import DatasetDefinition
from tasks.evaluate import evaluate_candidate
from tasks.features import (
    apply_feature_repo,
    build_training_set,
    find_new_batches,
    ingest_batch,
    materialize_features,
    render_feature_repo,
)
from tasks.monitor import profile_reference
from tasks.outcomes import build_served_training_set
from tasks.register import load_champion, register_model, write_model_card
from tasks.summary import publish_run_summary
from tasks.train import split_training_set, train_model
from tasks.triggers import link_decision_run
from tasks.validate import publish_validation_table, validate_batch


class TrainingParams(BaseModel):
    """What the Prefect UI shows as the run form."""

    dataset: str | None = Field(None, description="Dataset definition YAML (default: the settings' dataset)")
    batch: str | None = Field(None, description="One batch file to validate and ingest (default: every new file)")
    seed: int | None = Field(None, ge=0, description="Override train.seed")
    as_of: datetime | None = Field(None, description="Use labels known at this time (default: the project clock's now)")
    profile: Literal["local", "ci", "production"] | None = Field(None, description="Settings profile")
    config_dir: str | None = Field(None, description="Folder holding base.yaml (default: ./configs)")
    shuffle_labels: bool = Field(
        False, description="Fault injection for demos and tests: train on permuted labels (the gates must reject it)"
    )
    reason: str | None = Field(None, description="Why this run was requested (a retrain webhook's reason)")
    # set by the training deployment's trigger from the retrain event; empty when the event did not carry them
    decision_id: str | None = Field(None, description="The trigger decision that started this run (recorded on it)")
    trigger: str | None = Field(None, description="What kind of trigger started it (drift_detected, retrain_requested, "
                                                  "...): recorded on the registered version, picks its rollout plan")
    training_source: Literal["offline_store", "served_features"] | None = Field(
        None, description="Train on the offline store, or on the features the service used joined with their "
                          "outcomes (default: the dataset definition's `training_source`; a trigger rule may set it)")

    @field_validator("decision_id", "trigger", "reason", "training_source", mode="before")
    @classmethod
    def _empty_is_none(cls, value: Any) -> Any:
        return value or None  # a template field the event left empty ("") or null (`default(none)`): not set


SOURCE_TEXT = {"offline_store": "offline store (point-in-time join)",
               "served_features": "served features joined with their outcomes"}


def training_source(params: TrainingParams, dataset: DatasetDefinition) -> Literal["offline_store", "served_features"]:
    """What this run trains on: the run's own `training_source` (set by a trigger rule), else the dataset's.
    Served features need outcomes to join: a dataset that collects none fails here, naming the override."""
    source = params.training_source or dataset.training_source
    if source == "served_features" and dataset.outcomes is None:
        raise FlywheelError(f"training_source=served_features (from the run's parameters) joins served features "
                            f"with outcomes, but dataset {dataset.name!r} declares no `outcomes`")
    return source


def trigger_tag(trigger: str | None) -> dict[str, str]:
    """The registered version's tag saying why its training ran (the rollout picks its plan by it)."""
    from flywheel.registry import TAG_TRIGGER

    return {TAG_TRIGGER: trigger[:64]} if trigger else {}


class TrainingResult(BaseModel):
    model_name: str
    version: str
    # duplicate: the same data and config as a version registered already (that version is reported)
    outcome: Literal["champion", "challenger", "queued", "stale", "rejected", "duplicate"]
    alias: str | None
    feature_service: str
    run_id: str
    failed_rules: list[str] = []
    batches_ingested: int = 0
    training_source: Literal["offline_store", "served_features"] = "offline_store"
    training_rows: int = 0


@flow(name="training-pipeline", log_prints=True)
def training_pipeline(params: TrainingParams | None = None) -> State[Any]:
    """Validated batches -> point-in-time training set -> best model -> gates vs champion -> registry."""
    from flywheel.runtime import start_run_context

    params = params or TrainingParams()
    ctx = start_run_context(params.profile, params.config_dir, params.dataset, params.seed)
    settings, dataset, gates = ctx.settings, ctx.dataset, ctx.gates
    logger = get_run_logger()
    if params.decision_id:  # the decision (webhook, CLI, monitoring) links to the run it started
        link_decision_run(params.decision_id, ctx.audit_db_url)
    # the project clock's now (simulated in the demo), fixed once: recorded in lineage, reused by reproduce
    as_of = params.as_of or ctx.clock.now()
    source = training_source(params, dataset)  # checked before any batch is ingested

    batches = [Path(params.batch)] if params.batch else find_new_batches(dataset, ctx.source, ctx.offline_dir)
    quality = [validate_batch(batch, dataset, settings.validate_, ctx.quarantine_dir) for batch in batches]
    publish_validation_table(quality, dataset)
    for batch in batches:
        ingest_batch(batch, dataset, ctx.offline_dir, ctx.clock.now())  # the volume trigger counts from it
    logger.info("ingested %d new batch(es)", len(batches))

    repo = render_feature_repo(settings.stores, settings.paths.home)
    service = apply_feature_repo(repo, dataset, settings.features, ctx.offline_dir)
    materialize_features(repo, dataset, ctx.offline_dir, as_of)
    if source == "served_features":  # what the service actually used, with its outcomes
        # the prediction log and the outcomes are stamped on the project's clock, as `as_of` is: the same instant
        # is recorded in the lineage, so `flywheel reproduce` rebuilds this very frame
        frame = build_served_training_set(settings.store_url(settings.serve.prediction_log_url), ctx.audit_db_url,
                                          dataset, ctx.model_name, as_of)
    else:
        frame = build_training_set(repo, dataset, service, settings.features, ctx.offline_dir, as_of)
    logger.info("training set: %d rows from the %s", len(frame), SOURCE_TEXT[source])
    split = split_training_set(frame, dataset, params.shuffle_labels, ctx.train.seed)

    lineage = {**ctx.lineage(service, frame, as_of, quality, params.shuffle_labels), TAG_TRAINING_SOURCE: source}
    trained = train_model(split, dataset, ctx.train, gates, ctx.tracking_uri, ctx.artifact_location, lineage)
    profile_reference(trained.pipeline, split, dataset, trained.run_id, ctx.tracking_uri)
    champion = load_champion(ctx.tracking_uri, ctx.audit_db_url, ctx.model_name)
    report = evaluate_candidate(
        trained.pipeline, champion.pipeline if champion else None, trained.baseline, split.holdout, dataset,
        gates, trained.train_metric, trained.validation_metric, trained.run_id, ctx.tracking_uri, ctx.train.seed,
        "candidate", champion.version if champion else None,
    )
    card = write_model_card(ctx.model_name, dataset, service, trained, report, lineage)
    registered = register_model(
        trained.pipeline, split.holdout[dataset.feature_names].head(5), trained.run_id, ctx.model_name,
        report, card, {**lineage, **trained.lineage(), **trigger_tag(params.trigger)}, ctx.tracking_uri,
        ctx.audit_db_url, ctx.actor(), clock=ctx.clock,
    )

    result = TrainingResult(
        model_name=ctx.model_name, version=registered.version, outcome=registered.outcome,
        alias=registered.alias, feature_service=service, run_id=trained.run_id,
        failed_rules=report.failed_rules, batches_ingested=len(batches), training_source=source,
        training_rows=len(frame),
    )
    summary = publish_run_summary(_summary(ctx, result, report, trained.experiment_id, registered.reason),
                                  ctx.tracking_uri, trained.run_id)
    # a named state for every outcome but a plain success, so the runs list shows it; the tag finds them all
    name = {"rejected": "Rejected", "queued": "Queued", "stale": "Stale", "duplicate": "Duplicate"}.get(result.outcome,
                                                                                                "Completed")
    return Completed(name=name, message=f"{summary.title}: {summary.verdict}", data=result)


def _summary(ctx: Any, result: TrainingResult, report: Any, experiment_id: str, reason: str | None) -> RunSummary:
    ui = ctx.settings.mlflow_ui_url
    champion = report.champion_version
    verdict = {
        "rejected": f"failed gates: {', '.join(result.failed_rules)}",
        "champion": "passed its gates; first champion",
        "challenger": f"passed its gates against champion v{champion}; now challenger, the rollout takes it on",
        "duplicate": reason or "same data and config as a registered version",
    }.get(result.outcome, f"{result.outcome}: {reason}")
    return RunSummary(
        flow="training", model=result.model_name, version=result.version, outcome=result.outcome, verdict=verdict,
        champion=champion, mlflow_run_url=mlflow_run_url(ui, experiment_id, result.run_id),
        mlflow_version_url=mlflow_version_url(ui, result.model_name, result.version),
        details=[f"{result.batches_ingested} new batch(es) ingested; features from `{result.feature_service}`",
                 f"trained on {result.training_rows} rows from the {SOURCE_TEXT[result.training_source]}",
                 f"alias: {result.alias or 'none'}"],
    )
