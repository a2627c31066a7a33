"""Tasks for announced batches (`POST /hooks/data-landed`, `/hooks/labels-landed`): check the file is where a
batch may land, and count the labelled rows that arrived since the last training (the volume trigger)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from flywheel.errors import FlywheelError
from flywheel.landing import NotALandedBatch, incoming_folder, resolve_landed
from flywheel.schemas import DatasetDefinition
from tasks._prefect import run_logger


@task(name="check_landed_batch", task_run_name="check-landed-{batch}", cache_policy=NO_CACHE)
def check_landed_batch(batch: str, source: Path) -> Path:
    """The absolute path of `batch` if it is a batch file under the incoming folder of `source`; a run started
    by hand (the Prefect UI) is held to the receiver's rule. FlywheelError naming why not, before any work."""
    try:
        return resolve_landed(batch, incoming_folder(source))
    except NotALandedBatch as exc:
        raise FlywheelError(f"refusing the landed batch: {exc}") from None


@task(name="last_training_at", task_run_name="last-training-{model}", cache_policy=NO_CACHE, retries=2,
      retry_delay_seconds=2)
def last_training_at(audit_db_url: str, model: str) -> datetime | None:
    """When the newest version of `model` first took an alias (challenger, champion or the queue): the last
    training whose candidate passed its gates, from the audit log (no MLflow round trip); None if never."""
    from flywheel.audit import AuditLog

    audit = AuditLog(audit_db_url)
    try:
        first_seen: dict[str, datetime] = {}
        for entry in audit.entries(model):
            if entry.to_version is not None:
                first_seen.setdefault(entry.to_version, entry.at)
    finally:
        audit.dispose()
    newest = max(first_seen.values(), default=None)
    return newest.replace(tzinfo=UTC) if newest is not None and newest.tzinfo is None else newest


@task(name="count_new_labelled_rows", task_run_name="new-labelled-rows-{dataset.name}", cache_policy=NO_CACHE)
def count_new_labelled_rows(dataset: DatasetDefinition, offline_dir: Path, outcomes_url: str,
                            since: datetime | None) -> int:
    """Labelled rows that arrived after `since` (all of them when None): the label rows of feature batches
    ingested into the offline store, plus the outcomes (delayed labels) stored, by when each batch arrived."""
    from flywheel.featurestore import ingested_batches
    from flywheel.outcomes import OutcomeStore

    def after(at: datetime | str) -> bool:
        at = datetime.fromisoformat(at) if isinstance(at, str) else at
        return since is None or (at if at.tzinfo else at.replace(tzinfo=UTC)) > since

    batches = sum(int(b.get("label_rows", 0)) for b in ingested_batches(dataset, offline_dir).values()
                  if after(b["ingested_at"]))
    store = OutcomeStore(outcomes_url)
    try:
        outcomes = store.rows_ingested(dataset.name, lambda at: after(at))
    finally:
        store.close()
    run_logger("flywheel.triggers").info("%d labelled rows in batches and %d outcomes arrived since %s",
                                         batches, outcomes, since.isoformat() if since else "ever")
    return batches + outcomes
