"""The monitoring flow: one window of served traffic judged against the champion's reference profile.

served rows (prediction log) -> drift + data quality (GX suite) + alarm after persistence -> report ->
label-free performance estimate -> monitoring history -> the realized performance of recent windows whose
outcomes have arrived since, beside their estimates -> a summary artifact -> trigger decisions (a drift
alarm or a performance drop, realized or estimated, may start a retrain, and so may the volume of new
labels since the champion's training or the champion's age, under the cooldown, dedupe and pause rules of
configs/triggers.yaml; a data-quality alarm never does) and alarms sent to people, a silent loop's too.
`flywheel monitor` judges a batch file the same way; both record into the same history series (model,
`v<champion version>`).

`monitoring_backfill` catches up on N consecutive windows: each read and measured on its own (on Dask when
`monitor.parallelism` asks), then judged and recorded one after another in time order, so the persistence
rule sees the windows before each one as the scheduled flow would have. It records history only: no report,
MLflow run or trigger decision for past windows (the scheduled flow acts on the current one).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Literal

from prefect import flow
from pydantic import BaseModel, Field

from tasks.fanout import map_task
from tasks.landing import count_new_labelled_rows, last_training_at
from tasks.monitor import (
    assess_backfill_window,
    assess_window,
    estimate_window_performance,
    load_reference_profile,
    log_monitoring_run,
    previous_window_statuses,
    publish_window_summary,
    read_window,
    record_window,
    refresh_realized_performance,
    window_metrics,
    write_window_report,
)
from tasks.triggers import act_on_champion_state, act_on_realized, act_on_window, read_champion_state

if TYPE_CHECKING:
    from flywheel.clock import Clock


class MonitoringParams(BaseModel):
    """What the Prefect UI shows as the run form."""

    model_name: str | None = Field(None, description="Model to monitor (default: the settings' model)")
    window_hours: float = Field(1.0, gt=0, le=24 * 31, description="Length of the judged window, ending at `end`")
    end: datetime | None = Field(None, description="End of the window (default: now)")
    report: bool = Field(True, description="Write the Evidently HTML report of the window")
    profile: Literal["local", "ci", "production"] | None = Field(None, description="Settings profile")
    config_dir: str | None = Field(None, description="Folder holding base.yaml (default: ./configs)")


class MonitoringResult(BaseModel):
    model_name: str
    version: str
    rows: int
    status: str  # ok | drift | too_few_rows
    alarm: bool
    data_quality_alarm: bool
    drifted_features: list[str]
    estimated_roc_auc: float | None
    realized_roc_auc: float | None  # this window's, once enough of its outcomes arrived (rarely at once)
    realized: list[str]  # windows whose realized figures filled in this run: "<window key>: <summary>"
    window_id: int
    window: str  # its key: "<model>:<reference>:<start>/<end>" (trigger event ids, realized evaluations)
    report: str | None
    decisions: list[str]  # each trigger decision: "<kind>: <outcome> (<reason>)", volume and staleness last
    liveness_alarms: list[str]  # a silent loop (monitoring, outcomes): each alarm's summary
    mlflow_run: str  # the window's MLflow run (experiment settings.monitor.mlflow_experiment)


def window_bounds(end: datetime | None, hours: float, clock: Clock) -> tuple[datetime, datetime]:
    """(start, end) of the judged window: `hours` long, ending at `end`, else at the project clock's now (the
    prediction log's `at` is on that clock too)."""
    end = end or clock.now()
    return end - timedelta(hours=hours), end


@flow(name="monitoring", log_prints=True)
def monitoring(params: MonitoringParams | None = None) -> MonitoringResult:
    """Served window -> drift and data-quality verdicts vs the champion's reference -> estimate -> history ->
    realized figures of earlier windows -> summary -> trigger decisions and alarms (incl. volume, age, liveness)."""
    from flywheel.clock import build_clock
    from flywheel.monitoring.config import load_policy
    from flywheel.monitoring.history import window_record
    from flywheel.runtime import start_run_context
    from flywheel.trigger_policy import load_policy as load_trigger_policy

    params = params or MonitoringParams()
    ctx = start_run_context(params.profile, params.config_dir)
    settings, dataset = ctx.settings, ctx.dataset
    model = params.model_name or ctx.model_name
    clock = build_clock(settings.clock)  # windows, liveness and triggers: the project's time, not Prefect's
    start, end = window_bounds(params.end, params.window_hours, clock)
    policy = load_policy(settings.resolve(settings.monitor.policy_file)).for_dataset(dataset.name)

    version, profile = load_reference_profile(ctx.tracking_uri, ctx.audit_db_url, model, "champion")
    now = clock.now()
    # read before this window is recorded: liveness asks when monitoring last ran before now
    champion = read_champion_state(ctx.tracking_uri, ctx.audit_db_url, dataset.name, model, version, now)
    # volume counts as the ingest runs count it: labelled rows (batches and outcomes) since the last training
    trained_at = last_training_at(ctx.audit_db_url, model)
    champion = champion.model_copy(update={"last_training_at": trained_at, "new_labelled_rows":
                                           count_new_labelled_rows(dataset, ctx.offline_dir, ctx.audit_db_url,
                                                                   trained_at)})
    window = read_window(settings.store_url(settings.serve.prediction_log_url), model, version, start, end, dataset)
    reference = f"v{version}"
    previous = previous_window_statuses(ctx.audit_db_url, model, reference, start)
    assessment = assess_window(profile, window.frame, policy, previous, window.probabilities, dataset,
                               settings.validate_)
    report = None
    if params.report and policy.report.enabled and window.rows:
        folder = settings.resolve(settings.paths.reports_dir) / "monitoring" / model / reference
        report = write_window_report(profile, window.frame, assessment.drift,
                                     folder / f"{start:%Y%m%dT%H%M%S}_{end:%Y%m%dT%H%M%S}.html", policy)
    perf = policy.performance
    estimate = estimate_window_performance(window.probabilities, ctx.train.seed, perf.n_boot, perf.confidence)
    rec = window_record(model, version, reference, start, end, assessment.drift, assessment.quality,
                        assessment.verdict, str(report) if report else None, judged_at=now, estimate=estimate)
    window_id = record_window(ctx.audit_db_url, rec)
    triggers = load_trigger_policy(settings.resolve(settings.triggers.policy_file))
    # outcomes known by the end of the judged window (now, for the scheduled run) fill in earlier windows
    realized = refresh_realized_performance(
        ctx.audit_db_url, settings.store_url(settings.serve.prediction_log_url), ctx.audit_db_url, dataset, model,
        end, perf, triggers.rules.performance_degraded.min_labelled_rows, ctx.train.seed, now)
    summary = publish_window_summary(model, reference, start, end, assessment, estimate, report, realized)
    current = next((u for u in realized if u.key == rec.key), None)
    mlflow_run = log_monitoring_run(ctx.tracking_uri, ctx.artifact_location, settings.monitor.mlflow_experiment,
                                    model, version, reference, rec.key, window_metrics(assessment, estimate, current),
                                    summary, report)
    decisions = act_on_window(model, rec.key, end, assessment.verdict, estimate, str(report) if report else None,
                              triggers, settings.notify, ctx.audit_db_url, now, current)
    decisions += act_on_realized(model, realized, rec.key, triggers, settings.notify, ctx.audit_db_url, now)
    loop_decisions, silences = act_on_champion_state(champion, triggers, settings.notify, ctx.audit_db_url, now)

    verdict = assessment.verdict
    return MonitoringResult(
        model_name=model, version=version, rows=window.rows, status=verdict.status, alarm=verdict.alarm,
        data_quality_alarm=verdict.data_quality_alarm, drifted_features=list(verdict.drifted_features),
        estimated_roc_auc=estimate.roc_auc.value if estimate else None,
        realized_roc_auc=current.realized_roc_auc if current else None,
        realized=[f"{u.key}: {u.summary()}" for u in realized], window_id=window_id, window=rec.key,
        report=str(report) if report else None,
        decisions=[f"{d.kind}: {d.outcome} ({d.reason})" for d in [*decisions, *loop_decisions]],
        liveness_alarms=[a.summary for a in silences], mlflow_run=mlflow_run,
    )


class BackfillParams(BaseModel):
    """The run form of a monitoring backfill: `windows` consecutive windows of `window_hours`, the last ending
    at `end`."""

    model_name: str | None = Field(None, description="Model to monitor (default: the settings' model)")
    window_hours: float = Field(1.0, gt=0, le=24 * 31, description="Length of each window")
    windows: int = Field(24, ge=1, le=10_000, description="How many consecutive windows, the last ending at `end`")
    end: datetime | None = Field(None, description="End of the last window (default: now)")
    profile: Literal["local", "ci", "production"] | None = Field(None, description="Settings profile")
    config_dir: str | None = Field(None, description="Folder holding base.yaml (default: ./configs)")


class BackfilledWindow(BaseModel):
    window: str  # its key
    rows: int
    status: str  # ok | drift | too_few_rows
    streak: int
    alarm: bool
    data_quality_alarm: bool
    drifted_features: list[str]


class BackfillResult(BaseModel):
    model_name: str
    version: str
    parallel: bool  # measured on Dask (monitor.parallelism)
    windows: list[BackfilledWindow]  # oldest first


def backfill_bounds(end: datetime, hours: float, windows: int) -> list[tuple[datetime, datetime]]:
    """(start, end) of `windows` contiguous windows of `hours`, oldest first, the last ending at `end`."""
    step = timedelta(hours=hours)
    return [(end - (windows - i) * step, end - (windows - i - 1) * step) for i in range(windows)]


@flow(name="monitoring-backfill", log_prints=True)
def monitoring_backfill(params: BackfillParams | None = None) -> BackfillResult:
    """N windows measured (in parallel on Dask when monitor.parallelism asks), then judged and recorded in time
    order against the champion's reference profile."""
    from flywheel.clock import build_clock
    from flywheel.monitoring.alarms import judge_window
    from flywheel.monitoring.config import load_policy
    from flywheel.monitoring.history import window_record
    from flywheel.runtime import start_run_context

    params = params or BackfillParams()
    ctx = start_run_context(params.profile, params.config_dir)
    settings, dataset = ctx.settings, ctx.dataset
    model = params.model_name or ctx.model_name
    clock = build_clock(settings.clock)
    bounds = backfill_bounds(params.end or clock.now(), params.window_hours, params.windows)
    policy = load_policy(settings.resolve(settings.monitor.policy_file)).for_dataset(dataset.name)
    version, profile = load_reference_profile(ctx.tracking_uri, ctx.audit_db_url, model, "champion")
    reference = f"v{version}"
    log_url = settings.store_url(settings.serve.prediction_log_url)
    calls = [{"log_url": log_url, "model_name": model, "version": version, "start": start, "end": end,
              "dataset": dataset, "profile": profile, "policy": policy, "validate_cfg": settings.validate_,
              "perf": policy.performance, "seed": ctx.train.seed} for start, end in bounds]
    measured = map_task(settings.monitor.parallelism, assess_backfill_window, calls)
    now = clock.now()
    out = []
    for (start, end), (assessment, estimate) in zip(bounds, measured, strict=True):
        # in time order: the statuses before this window include the backfill's earlier windows, just recorded
        previous = previous_window_statuses(ctx.audit_db_url, model, reference, start)
        verdict = judge_window(assessment.drift, assessment.quality, previous, policy.alarm)
        rec = window_record(model, version, reference, start, end, assessment.drift, assessment.quality, verdict,
                            report_path=None, judged_at=now, estimate=estimate)  # backfills write no report
        record_window(ctx.audit_db_url, rec)
        out.append(BackfilledWindow(window=rec.key, rows=verdict.rows, status=verdict.status, streak=verdict.streak,
                                    alarm=verdict.alarm, data_quality_alarm=verdict.data_quality_alarm,
                                    drifted_features=list(verdict.drifted_features)))
    print(f"backfilled {len(out)} window(s) of {model} {reference}: "
          f"{sum(w.alarm for w in out)} alarm(s), {sum(w.status == 'drift' for w in out)} drifted")
    return BackfillResult(model_name=model, version=version, parallel=settings.monitor.parallelism.parallel,
                          windows=out)
