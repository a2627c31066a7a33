"""Monitoring stage: the reference profile at training time, and the pieces a monitoring flow judges a
window with (each a thin task over flywheel/monitoring; the CLI `flywheel monitor` composes the same)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE

from flywheel.monitoring.alarms import WindowStatus
from flywheel.monitoring.config import DatasetPolicy, PerformanceSettings
from flywheel.monitoring.drift import DriftResult
from flywheel.monitoring.history import WindowRecord
from flywheel.monitoring.performance import Estimate
from flywheel.monitoring.profile import ReferenceProfile
from flywheel.monitoring.realized import WindowPerformance
from flywheel.monitoring.serving import ServingWindow
from flywheel.monitoring.window import WindowAssessment
from flywheel.schemas import DatasetDefinition
from flywheel.settings import ValidateConfig
from flywheel.training import Split
from tasks._prefect import retry_transient, run_logger


@task(name="profile_reference", task_run_name="profile-reference-{dataset.name}", cache_policy=NO_CACHE,
      retries=2, retry_delay_seconds=5, retry_condition_fn=retry_transient)
def profile_reference(pipeline: Any, split: Split, dataset: DatasetDefinition, run_id: str, tracking_uri: str) -> str:
    """Profile the rows the model was fitted on (features and its P(positive)) into its training run."""
    from mlflow import MlflowClient

    from flywheel.monitoring.profile import profile_frame
    from flywheel.monitoring.reference import log_profile
    from flywheel.training import predict_scores

    frame = split.train_validation
    profile = profile_frame(frame, dataset, predictions=predict_scores(pipeline, frame, dataset))
    path = log_profile(MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri), run_id, profile)
    run_logger("flywheel.monitor").info("reference profile of %d rows, %d features -> run %s %s",
                                        profile.rows, len(profile.features), run_id, path)
    return path


@task(name="load_reference_profile", task_run_name="load-profile-{model_name}-{reference}", cache_policy=NO_CACHE,
      retries=2, retry_delay_seconds=5, retry_condition_fn=retry_transient)
def load_reference_profile(tracking_uri: str, audit_db_url: str, model_name: str, reference: str = "champion"
                           ) -> tuple[str, ReferenceProfile]:
    """(version, profile) of the version an alias (or a version number) names."""
    from flywheel.audit import AuditLog
    from flywheel.monitoring.reference import load_version_profile, resolve_version
    from flywheel.registry import Registry

    registry = Registry(tracking_uri, AuditLog(audit_db_url))
    version = resolve_version(registry, model_name, reference)
    return version, load_version_profile(registry, model_name, version)


@task(name="previous_window_statuses", task_run_name="history-{model_name}", cache_policy=NO_CACHE,
      retries=2, retry_delay_seconds=5, retry_condition_fn=retry_transient)
def previous_window_statuses(history_url: str, model_name: str, reference: str, before: datetime
                             ) -> list[WindowStatus]:
    """Statuses of the series' windows that ended before `before`, oldest first (persistence reads them)."""
    from flywheel.monitoring.history import MonitoringHistory

    history = MonitoringHistory(history_url)
    try:
        return [r.status for r in history.previous(model_name, reference, before)]
    finally:
        history.close()


@task(name="assess_window", task_run_name="assess-window-{dataset.name}", cache_policy=NO_CACHE)
def assess_window(profile: ReferenceProfile, window: pd.DataFrame, policy: DatasetPolicy,
                 previous: Sequence[WindowStatus], predictions: np.ndarray | None, dataset: DatasetDefinition,
                 validate_cfg: ValidateConfig) -> WindowAssessment:
    """Drift, data quality (GX suite included) and the alarm verdict of one window."""
    from flywheel.monitoring import window as core

    return core.assess_window(profile, window, policy, previous, predictions, dataset, validate_cfg)


@task(name="assess_backfill_window", task_run_name="assess-window-{start:%Y%m%dT%H%M%S}", cache_policy=NO_CACHE,
      retries=2, retry_delay_seconds=5, retry_condition_fn=retry_transient)
def assess_backfill_window(log_url: str, model_name: str, version: str, start: datetime, end: datetime,
                           dataset: DatasetDefinition, profile: ReferenceProfile, policy: DatasetPolicy,
                           validate_cfg: ValidateConfig, perf: PerformanceSettings, seed: int
                           ) -> tuple[WindowAssessment, Estimate | None]:
    """One window of a backfill, read and measured on its own (a Dask worker may run it): drift, data quality
    and the estimate. Its verdict here ignores the windows before it; the backfill judges it again, in time
    order, once those are recorded (persistence)."""
    from flywheel.monitoring import window as core
    from flywheel.monitoring.performance import estimate_performance
    from flywheel.monitoring.serving import read_serving_window

    window = read_serving_window(log_url, model_name, version, start, end, dataset)
    assessment = core.assess_window(profile, window.frame, policy, [], window.probabilities, dataset, validate_cfg)
    estimate = (estimate_performance(np.asarray(window.probabilities, float), perf.n_boot, perf.confidence, seed)
                if window.rows else None)
    return assessment, estimate


@task(name="write_window_report", task_run_name="report-{path.name}", cache_policy=NO_CACHE)
def write_window_report(profile: ReferenceProfile, window: pd.DataFrame, drift: DriftResult, path: Path,
                        policy: DatasetPolicy) -> Path:
    """The window's Evidently HTML report (reference rebuilt from the profile)."""
    from flywheel.monitoring.report import write_report

    return write_report(profile, window, drift, path, policy.report)


@task(name="record_window", task_run_name="record-{rec.model}-{rec.reference}", cache_policy=NO_CACHE,
      retries=2, retry_delay_seconds=5, retry_condition_fn=retry_transient)
def record_window(history_url: str, rec: WindowRecord) -> int:
    """Store the judged window in the monitoring history; its id."""
    from flywheel.monitoring.history import MonitoringHistory

    history = MonitoringHistory(history_url)
    try:
        return history.record(rec)
    finally:
        history.close()


@task(name="read_window", task_run_name="read-window-{model_name}-v{version}", cache_policy=NO_CACHE,
      retries=2, retry_delay_seconds=5, retry_condition_fn=retry_transient)
def read_window(log_url: str, model_name: str, version: str, start: datetime, end: datetime,
                dataset: DatasetDefinition) -> ServingWindow:
    """The champion's served rows in [start, end) from the prediction log."""
    from flywheel.monitoring.serving import read_serving_window

    window = read_serving_window(log_url, model_name, version, start, end, dataset)
    run_logger("flywheel.monitor").info("window %s - %s: %d served rows of %s v%s", start, end, window.rows,
                                        model_name, version)
    return window


@task(name="estimate_window_performance", task_run_name="estimate-performance", cache_policy=NO_CACHE)
def estimate_window_performance(probabilities: np.ndarray, seed: int, n_boot: int = 200,
                                confidence: float = 0.95) -> Estimate | None:
    """ROC AUC and accuracy expected from the served probabilities alone (None for an empty window)."""
    from flywheel.monitoring.performance import estimate_performance

    if len(probabilities) == 0:
        return None
    return estimate_performance(np.asarray(probabilities, float), n_boot, confidence, seed)


@task(name="refresh_realized_performance", task_run_name="realized-{model_name}", cache_policy=NO_CACHE,
      retries=2, retry_delay_seconds=5, retry_condition_fn=retry_transient)
def refresh_realized_performance(history_url: str, log_url: str, outcomes_url: str, dataset: DatasetDefinition,
                                 model_name: str, as_of: datetime, settings: PerformanceSettings,
                                 min_labelled_rows: int, seed: int, now: datetime | None = None
                                 ) -> list[WindowPerformance]:
    """Fill in the realized performance of the recent windows whose outcomes arrived by `as_of` (appended
    evaluations dated `now`; flywheel/monitoring/realized.py)."""
    from flywheel.monitoring.realized import refresh_realized

    updates = refresh_realized(history_url, log_url, outcomes_url, dataset, model_name, as_of, settings.lookback,
                               min_labelled_rows, n_boot=settings.n_boot, confidence=settings.confidence, seed=seed,
                               evaluated_at=now)
    log = run_logger("flywheel.monitor")
    for u in updates:
        log.info("window %s: %s", u.key, u.summary())
    return updates


def realized_markdown(updates: Sequence[WindowPerformance]) -> str:
    """The windows whose realized figures filled in this run, beside their estimates (markdown)."""
    if not updates:
        return ""
    lines = ["### Realized beside the estimate (outcomes that arrived since)", "",
             "| window | labelled / scored | ROC AUC realized | estimated | error | accuracy realized | estimated "
             "| error |", "|---|---|---|---|---|---|---|---|"]

    def f(v: float | None) -> str:
        return "-" if v is None else f"{v:.3f}"

    for u in updates:
        lines.append(f"| {u.reference} {u.window_start:%Y-%m-%d %H:%M} - {u.window_end:%H:%M} | {u.labelled_rows} / "
                     f"{u.scored_rows} | {f(u.realized_roc_auc)} | {f(u.estimated_roc_auc)} | {f(u.roc_auc_error)} | "
                     f"{f(u.realized_accuracy)} | {f(u.estimated_accuracy)} | {f(u.accuracy_error)} |")
    return "\n".join(lines)


@task(name="publish_window_summary", task_run_name="summary-{model_name}-{reference}", cache_policy=NO_CACHE)
def publish_window_summary(model_name: str, reference: str, start: datetime, end: datetime,
                           assessment: WindowAssessment, estimate: Estimate | None, report: Path | None,
                           realized: Sequence[WindowPerformance] = ()) -> str:
    """The window's verdict, estimate, the realized figures filled in this run and the report link as
    markdown; a Prefect artifact inside a run."""
    from flywheel.monitoring.window import verdict_markdown
    from tasks._prefect import in_run

    markdown = verdict_markdown(model_name, reference, start, end, assessment)
    if estimate is not None:
        r, a = estimate.roc_auc, estimate.accuracy
        markdown += (f"\n\nEstimated without labels ({estimate.n} rows): ROC AUC {r.value:.3f} "
                     f"[{r.lower:.3f}, {r.upper:.3f}], accuracy {a.value:.3f} [{a.lower:.3f}, {a.upper:.3f}] "
                     "(label noise only; concept drift is invisible to it)")
    if realized:
        markdown += "\n\n" + realized_markdown(realized)
    if report is not None:
        markdown += f"\n\nEvidently report: `{report}`"
    if in_run():
        from prefect.artifacts import create_markdown_artifact

        verdict = assessment.verdict
        create_markdown_artifact(markdown=markdown, key=f"monitoring-{model_name.replace('_', '-')}",
                                 description=f"{model_name} {reference}: {verdict.status}"
                                 + (" ALARM" if verdict.alarm else ""))
    return markdown


def window_metrics(assessment: WindowAssessment, estimate: Estimate | None,
                   realized: WindowPerformance | None) -> dict[str, float]:
    """The window's key numbers as MLflow metrics (per-feature drift scores as `drift.<feature>`)."""
    verdict, drift = assessment.verdict, assessment.drift
    metrics = {"rows": float(verdict.rows), "share_drifted": verdict.share_drifted,
               "drift_alarm": float(verdict.alarm), "drift_streak": float(verdict.streak),
               "data_quality_alarm": float(verdict.data_quality_alarm)}
    metrics.update({f"drift.{c.column}": c.score for c in drift.columns if c.score is not None})
    if drift.prediction is not None and drift.prediction.score is not None:
        metrics["prediction_drift"] = drift.prediction.score
    if estimate is not None:
        metrics.update({"estimated_roc_auc": estimate.roc_auc.value, "estimated_accuracy": estimate.accuracy.value})
    if realized is not None and realized.realized_roc_auc is not None:
        metrics["realized_roc_auc"] = realized.realized_roc_auc
    return {k: float(v) for k, v in metrics.items() if v is not None and np.isfinite(v)}


@task(name="log_monitoring_run", task_run_name="mlflow-{model_name}-{reference}", cache_policy=NO_CACHE,
      retries=2, retry_delay_seconds=5, retry_condition_fn=retry_transient)
def log_monitoring_run(tracking_uri: str, artifact_location: str, experiment: str, model_name: str, version: str,
                       reference: str, window_key: str, metrics: dict[str, float], summary: str,
                       report: Path | None) -> str:
    """One MLflow run per judged window: its metrics in one batch, the summary as the run's description and
    the Evidently report as an artifact. The run's id."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    from tasks.train import ensure_experiment

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    experiment_id = ensure_experiment(client, experiment, artifact_location, run_logger("flywheel.monitor"))
    run = client.create_run(experiment_id, run_name=f"{model_name} v{version} {window_key.rsplit(':', 1)[-1]}",
                            tags={"flywheel.model": model_name, "flywheel.version": str(version),
                                  "flywheel.reference": reference, "flywheel.window": window_key,
                                  "mlflow.note.content": summary})
    stamp = int(datetime.now().timestamp() * 1000)  # MLflow's record time (wall); the window is in the tags
    client.log_batch(run.info.run_id, metrics=[Metric(k, v, stamp, 0) for k, v in sorted(metrics.items())])
    if report is not None and Path(report).exists():
        client.log_artifact(run.info.run_id, str(report), "report")
    client.set_terminated(run.info.run_id)
    return run.info.run_id
