"""The materialization flow: load the offline features not yet in the online store (deployment
`materialization`, on the cron of configs/triggers.yaml `schedules.materialization`).

The ingest ledger says which batches the online store has not seen (flywheel/featurestore.py
`materialize_online`), so late or replayed batches of past events are loaded too; nothing new is a no-op.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from prefect import flow
from pydantic import BaseModel, Field

from flywheel.featurestore import MaterializeReport, ingested_batches
from tasks.features import apply_feature_repo, materialize_features, render_feature_repo


class MaterializationParams(BaseModel):
    """What the Prefect UI shows as the run form."""

    end: datetime | None = Field(None, description="Load features that arrived up to this time (default: now)")
    profile: Literal["local", "ci", "production"] | None = Field(None, description="Settings profile")
    config_dir: str | None = Field(None, description="Folder holding base.yaml (default: ./configs)")


@flow(name="materialization", log_prints=True)
def materialization(params: MaterializationParams | None = None) -> MaterializeReport:
    """Offline features not yet online -> the online store."""
    from flywheel.runtime import start_run_context

    params = params or MaterializationParams()
    ctx = start_run_context(params.profile, params.config_dir)
    settings, dataset = ctx.settings, ctx.dataset
    end = params.end or ctx.clock.now()  # the project clock's: simulated event times load too
    if not ingested_batches(dataset, ctx.offline_dir):  # a fresh stack: nothing to load yet, not a failure
        print(f"no batch of {dataset.name} ingested yet: nothing to materialize")
        return MaterializeReport(dataset=dataset.name, end=end, loads=[], seconds=0.0)
    repo = render_feature_repo(settings.stores, settings.paths.home)
    apply_feature_repo(repo, dataset, settings.features, ctx.offline_dir)
    return materialize_features(repo, dataset, ctx.offline_dir, end)
