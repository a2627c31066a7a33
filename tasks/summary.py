"""Publish what a finished flow run did: its name (`churn-v3-rejected`), an `outcome:<name>` tag, one summary
artifact with links to MLflow, the MLflow run's description linking back, and optionally an event."""

from __future__ import annotations

from typing import Any

from flywheel.runsummary import OUTCOME_TAG_PREFIX, RunSummary, slug
from tasks._prefect import in_run, run_logger


def prefect_run_url() -> str | None:
    """The current flow run's page in the Prefect UI; None outside a run or without a UI address."""
    from prefect.runtime import flow_run
    from prefect.settings import PREFECT_UI_URL

    ui = PREFECT_UI_URL.value()
    return f"{ui}/runs/flow-run/{flow_run.id}" if flow_run.id and ui else None


def _tag_and_rename(summary: RunSummary) -> None:
    from prefect.client.orchestration import get_client
    from prefect.runtime import flow_run

    with get_client(sync_client=True) as client:
        run = client.read_flow_run(flow_run.id)
        # an earlier outcome tag (a retried run) is replaced, not kept next to the new one
        tags = sorted({t for t in run.tags if not t.startswith(OUTCOME_TAG_PREFIX)} | {summary.tag})
        client.update_flow_run(flow_run.id, name=summary.name, tags=tags)


def describe_mlflow_run(tracking_uri: str, run_id: str, note: str) -> None:
    """The MLflow run's description (`mlflow.note.content`, markdown, shown on the run page)."""
    from mlflow import MlflowClient

    MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri).set_tag(run_id, "mlflow.note.content", note)


def publish_run_summary(summary: RunSummary, tracking_uri: str | None = None, mlflow_run_id: str | None = None,
                        event: str | None = None, payload: dict[str, Any] | None = None) -> RunSummary:
    """Name and tag the flow run by its outcome, attach the summary artifact, describe the MLflow run and
    emit `event` (about the model version) when given. The summary is a report: a failure here is logged,
    never raised over the outcome it reports.

    A plain function, not a task: called in the flow, its artifact belongs to the flow run itself, so the run's
    Artifacts tab starts with it (under "Flow run"), above the task runs' artifacts."""
    log = run_logger("flywheel.summary")
    summary = summary.model_copy(update={"prefect_run_url": summary.prefect_run_url or prefect_run_url()})
    try:
        if tracking_uri and mlflow_run_id:
            describe_mlflow_run(tracking_uri, mlflow_run_id, summary.mlflow_note())
        if in_run():
            from prefect.artifacts import create_markdown_artifact

            _tag_and_rename(summary)
            create_markdown_artifact(markdown=summary.markdown(), key=f"summary-{slug(summary.model)}",
                                     description=summary.title[:500])
    except Exception as exc:  # the outcome stands without its summary
        log.warning("could not publish the summary of %s: %s", summary.name, exc)
    if event and summary.version:
        from tasks.register import emit_model_event  # never raises

        emit_model_event(event, summary.model, summary.version,
                         {"outcome": summary.outcome, "verdict": summary.verdict, **(payload or {})},
                         related_run_id=mlflow_run_id)
    log.info("%s: %s (%s)", summary.name, summary.verdict, summary.tag)
    return summary
