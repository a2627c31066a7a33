"""Evaluation gates as a Prefect task: score the candidate vs the rules and the champion; how reports name them."""

from __future__ import annotations

import json
import re
import time
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


def log_gate_metrics_to_mlflow(tracking_uri: str | None, run_id: str, report: GateReport) -> None:
    """Every numeric gate value as `gate.<rule>`, and `gate.passed`, in one batch. The report itself is stored
    once the candidate has a version (tasks/register.py), so that it names it."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    now = int(time.time() * 1000)
    metrics = {gate_metric_name(r.rule): float(r.value) for r in report.results if r.value is not None}
    metrics["gate.passed"] = 1.0 if report.passed else 0.0
    client.log_batch(run_id, metrics=[Metric(k, v, now, 0) for k, v in metrics.items()])


def versions_label(model: str, report: GateReport) -> str:
    """`churn v3 vs champion v2`, `churn v1 vs no champion`: how gate reports name what they compared."""
    candidate = f"v{report.candidate_version}" if report.candidate_version else "candidate"
    against = f"champion v{report.champion_version}" if report.champion_version else "no champion"
    return f"{model} {candidate} vs {against}"


def render_named_gate_report(model: str, report: GateReport) -> str:
    return render_gate_report(report, f"Gate report: {versions_label(model, report)}")


def _evaluate_run_name() -> str:
    from prefect.runtime import task_run

    p = task_run.parameters
    champion = f"v{p['champion_version']}" if p.get("champion_version") else "no-champion"
    return f"evaluate-{p['candidate_label']}-vs-{champion}"


@task(
    name="evaluate_candidate",
    task_run_name=_evaluate_run_name,
    cache_policy=NO_CACHE,
    retries=1,  # only the MLflow writes can fail transiently; the scoring is deterministic
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
    """Run every gate on the holdout; log the gate values to the MLflow run. The report (markdown, Prefect
    artifact) is published by registration, once the candidate has a version number to be named by."""
    report = evaluate_gates(
        candidate, champion, baseline, holdout, dataset, cfg, train_metric, validation_metric,
        seed=seed, candidate_version=None, champion_version=champion_version,
    )  # fmt: skip
    verdict = "PASSED" if report.passed else f"REJECTED ({', '.join(report.failed_rules)})"
    if in_run():
        get_run_logger().info("gates %s for %s vs champion %s", verdict, candidate_label, champion_version)
    if mlflow_run_id:
        log_gate_metrics_to_mlflow(tracking_uri, mlflow_run_id, report)
    return report
