"""Announced batches acted on: the `ingest` and `outcomes` deployments run these flows on the webhook
receiver's `flywheel.data.landed` / `flywheel.labels.landed` events (deployments/prefect.yaml).

data_landed:   check the file -> validate (quarantined if bad) -> ingest -> materialize -> the volume trigger
labels_landed: check the file -> validate and store the outcomes (quarantined if bad) -> the volume trigger

A batch already ingested adds nothing (idempotent by file name, outcomes by content). The volume trigger
counts the labelled rows that arrived since the last training (configs/triggers.yaml `volume_reached`);
its decision is recorded, and a fired one emits the retrain event the training deployment runs on.
"""

from __future__ import annotations

from typing import Literal

from prefect import flow
from pydantic import BaseModel, Field

from flywheel.runtime import RunContext
from tasks.features import apply_feature_repo, ingest_batch, materialize_features, render_feature_repo
from tasks.landing import check_landed_batch, count_new_labelled_rows, last_training_at
from tasks.outcomes import ingest_outcomes
from tasks.triggers import decide_trigger
from tasks.validate import validate_batch


class LandedParams(BaseModel):
    """What the Prefect UI shows as the run form (the deployments' triggers fill `batch` and `delivery`)."""

    batch: str = Field(description="The batch file: under the dataset's incoming folder (relative, or absolute)")
    delivery: str | None = Field(None, description="The webhook delivery that announced it")
    profile: Literal["local", "ci", "production"] | None = Field(None, description="Settings profile")
    config_dir: str | None = Field(None, description="Folder holding base.yaml (default: ./configs)")


class LandedResult(BaseModel):
    dataset: str
    batch: str
    rows: int  # rows the batch added (0: already ingested)
    skipped: bool
    new_labelled_rows: int
    decision: str  # the volume trigger's: "<outcome> (<reason>)"


@flow(name="data-landed", log_prints=True)
def data_landed(params: LandedParams) -> LandedResult:
    """A feature batch landed: validated, ingested into the offline store, loaded online; then the triggers."""
    from flywheel.runtime import start_run_context

    ctx = start_run_context(params.profile, params.config_dir)
    settings, dataset = ctx.settings, ctx.dataset
    batch = check_landed_batch(params.batch, ctx.source)
    validate_batch(batch, dataset, settings.validate_, ctx.quarantine_dir)
    # the project clock's time: the volume trigger compares it with the last training's, on the same clock
    ingested = ingest_batch(batch, dataset, ctx.offline_dir, ctx.clock.now())
    repo = render_feature_repo(settings.stores, settings.paths.home)
    apply_feature_repo(repo, dataset, settings.features, ctx.offline_dir)
    materialize_features(repo, dataset, ctx.offline_dir, ctx.clock.now())
    new_rows, decision = decide_volume(ctx)
    return LandedResult(dataset=dataset.name, batch=str(batch), rows=ingested.feature_rows, skipped=ingested.skipped,
                        new_labelled_rows=new_rows, decision=decision)


@flow(name="labels-landed", log_prints=True)
def labels_landed(params: LandedParams) -> LandedResult:
    """A batch of outcomes (delayed labels) landed: validated and stored; then the triggers."""
    from flywheel.errors import FlywheelError
    from flywheel.runtime import start_run_context

    ctx = start_run_context(params.profile, params.config_dir)
    dataset = ctx.dataset
    if dataset.outcomes is None or dataset.outcomes.source is None:
        raise FlywheelError(f"dataset {dataset.name!r} declares no outcomes.source: labels cannot land")
    batch = check_landed_batch(params.batch, ctx.settings.resolve(dataset.outcomes.source))
    stored = ingest_outcomes(batch, dataset, ctx.audit_db_url, ctx.quarantine_dir, ctx.clock.now())
    new_rows, decision = decide_volume(ctx)
    return LandedResult(dataset=dataset.name, batch=str(batch), rows=stored.rows, skipped=stored.skipped,
                        new_labelled_rows=new_rows, decision=decision)


def decide_volume(ctx: RunContext) -> tuple[int, str]:
    """The volume trigger on what arrived since the last training: (new labelled rows, the decision)."""
    from flywheel.trigger_policy import load_policy
    from flywheel.triggers import volume_signal

    settings = ctx.settings
    policy = load_policy(settings.resolve(settings.triggers.policy_file))
    since = last_training_at(ctx.audit_db_url, ctx.model_name)
    new_rows = count_new_labelled_rows(ctx.dataset, ctx.offline_dir, ctx.audit_db_url, since)
    now = ctx.clock.now()
    signal = volume_signal(new_rows, policy.rules.volume_reached, model=ctx.model_name, occurred=now, since=since)
    decision = decide_trigger(signal, policy, ctx.audit_db_url, now)
    return new_rows, f"{decision.outcome} ({decision.reason})"
