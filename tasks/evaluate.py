"""Evaluation gates as a Prefect task: score the candidate vs the rules and the champion, publish the report."""

from __future__ import annotations

import json
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flywheel.gates import evaluate_gates, render_gate_report
from flywheel.schemas import DatasetDefinition, GateReport, GatesConfig
from tasks._prefect import in_run


def gate_metric_name(rule: str) -> str:
    """`slice:region=north` -> `gate.slice_region_north` (MLflow metric keys allow [\\w ./-] only)."""
    return "gate." + re.sub(r"[^A-Za-z0-9_.\-/]+", "_", rule).strip("_")


def report_json(report: GateReport) -> str:
    """The report as JSON, with the verdict spelled out (`passed` is a property, not a field)."""
    return json.dumps(
        {"passed": report.passed, "failed_rules": report.failed_rules, **report.model_dump(mode="json")}, indent=2
    )


def log_gate_report_to_mlflow(tracking_uri: str | None, run_id: str, report: GateReport, markdown: str) -> None:
    """Artifacts `gates/gate_report.{md,json}` and every numeric gate value as `gate.<rule>`, in one batch."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "gates"
        folder.mkdir()
        (folder / "gate_report.md").write_text(markdown, encoding="utf-8")
        (folder / "gate_report.json").write_text(report_json(report), encoding="utf-8")
        client.log_artifacts(run_id, str(folder), artifact_path="gates")
    now = int(time.time() * 1000)
    metrics = {gate_metric_name(r.rule): float(r.value) for r in report.results if r.value is not None}
    metrics["gate.passed"] = 1.0 if report.passed else 0.0
    client.log_batch(run_id, metrics=[Metric(k, v, now, 0) for k, v in metrics.items()])


@task(
    name="evaluate_candidate",
    task_run_name="evaluate-{candidate_label}-vs-{champion_version}",
    cache_policy=NO_CACHE,
    retries=1,  # only the MLflow/Prefect-API writes can fail transiently; the scoring is deterministic
    retry_delay_seconds=10,
)
def evaluate_candidate(
    candidate: Any,
    champion: Any | None,
    baseline: Any,
    holdout: pd.DataFrame,
    dataset: DatasetDefinition,
    cfg: GatesConfig,
    train_metric: float,
    validation_metric: float,
    mlflow_run_id: str | None,
    tracking_uri: str | None,
    seed: int,
    candidate_label: str,
    champion_version: str | None,
) -> GateReport:
    """Run every gate on the holdout, publish the markdown report (Prefect artifact, MLflow run)."""
    report = evaluate_gates(
        candidate, champion, baseline, holdout, dataset, cfg, train_metric, validation_metric,
        seed=seed, candidate_version=candidate_label, champion_version=champion_version,
    )  # fmt: skip
    markdown = render_gate_report(report, f"Gate report: {dataset.name} {candidate_label}")
    verdict = "PASSED" if report.passed else f"REJECTED ({', '.join(report.failed_rules)})"
    # Outside a flow/task run (unit tests call `.fn`) there is no run to attach an artifact to, and
    # creating one would start an ephemeral Prefect server.
    if in_run():
        from prefect.artifacts import create_markdown_artifact

        create_markdown_artifact(
            markdown=markdown,
            key=f"gate-report-{dataset.name.replace('_', '-')}",
            description=f"Gates for {dataset.name} {candidate_label} vs champion {champion_version}: {verdict}",
        )
        get_run_logger().info("gates %s for %s vs champion %s", verdict, candidate_label, champion_version)
    if mlflow_run_id:
        log_gate_report_to_mlflow(tracking_uri, mlflow_run_id, report, markdown)
    return report
