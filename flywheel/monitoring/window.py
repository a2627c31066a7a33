"""One window, judged end to end: drift and data quality against the profile, the alarm rules over the
recorded history, the report, and the row in the history. The CLI calls `monitor_window` once per batch;
the scheduled flow composes the same pieces (`assess_window`, `MonitoringHistory`, `write_report`) as tasks.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict

from flywheel.monitoring.alarms import WindowStatus, WindowVerdict, judge_window
from flywheel.monitoring.config import DatasetPolicy
from flywheel.monitoring.drift import DriftResult, drift_from_profile
from flywheel.monitoring.history import MonitoringHistory, WindowRecord, window_record
from flywheel.monitoring.profile import MonitoringError, ReferenceProfile
from flywheel.monitoring.quality import QualityResult, expectation_failures, profile_quality, with_expectations
from flywheel.schemas import DatasetDefinition
from flywheel.settings import ValidateConfig

if TYPE_CHECKING:
    from flywheel.monitoring.performance import Estimate

log = logging.getLogger(__name__)


class WindowAssessment(BaseModel):
    model_config = ConfigDict(frozen=True)

    drift: DriftResult
    quality: QualityResult
    verdict: WindowVerdict


class MonitoredWindow(BaseModel):
    model_config = ConfigDict(frozen=True)

    assessment: WindowAssessment
    record: WindowRecord
    report_path: Path | None = None
    report_error: str | None = None  # the report failed; the verdict stands and was recorded


def window_bounds(window: pd.DataFrame, dataset: DatasetDefinition) -> tuple[datetime, datetime]:
    """(first, last) event time of the window's rows; MonitoringError when it has no usable timestamps."""
    if dataset.timestamp not in window.columns:
        raise MonitoringError(f"the window has no {dataset.timestamp!r} column to date it: give its start and end")
    ts = pd.to_datetime(window[dataset.timestamp], utc=True, errors="coerce").dropna()
    if ts.empty:
        raise MonitoringError(f"the window's {dataset.timestamp!r} column holds no timestamps: give its start and end")
    return ts.min().to_pydatetime(), ts.max().to_pydatetime()


def assess_window(profile: ReferenceProfile, window: pd.DataFrame, policy: DatasetPolicy,
                  previous: Sequence[WindowStatus], predictions: np.ndarray | None = None,
                  dataset: DatasetDefinition | None = None, validate_cfg: ValidateConfig | None = None
                  ) -> WindowAssessment:
    """Drift, data quality (with the dataset's GX suite when `dataset` is given and the policy asks) and
    the alarm verdict given the statuses of the windows before it (oldest first). No I/O but GX's."""
    drift = drift_from_profile(profile, window, policy.drift, predictions)
    quality = profile_quality(profile, window, policy.quality)
    if policy.quality.great_expectations and dataset is not None:
        failures = expectation_failures(window, dataset, validate_cfg or ValidateConfig())
        quality = with_expectations(quality, failures)
    return WindowAssessment(drift=drift, quality=quality, verdict=judge_window(drift, quality, previous, policy.alarm))


def monitor_window(profile: ReferenceProfile, window: pd.DataFrame, policy: DatasetPolicy,
                   history: MonitoringHistory, *, model: str, version: str | None, reference: str,
                   start: datetime, end: datetime, predictions: np.ndarray | None = None,
                   dataset: DatasetDefinition | None = None, validate_cfg: ValidateConfig | None = None,
                   report_path: Path | None = None, estimate: Estimate | None = None,
                   judged_at: datetime) -> MonitoredWindow:
    """Judge one window against the recorded windows of its series (model, reference) that ended before
    it began, write its report (when `report_path` is given) and record it as judged at `judged_at` (the
    project clock's now: liveness compares it with the project's time)."""
    if end < start:
        raise MonitoringError(f"window end {end.isoformat()} is before its start {start.isoformat()}")
    previous = [r.status for r in history.previous(model, reference, before=start)]
    assessment = assess_window(profile, window, policy, previous, predictions, dataset, validate_cfg)
    written, error = None, None
    if report_path is not None:
        from flywheel.monitoring.report import write_report

        try:
            written = write_report(profile, window, assessment.drift, report_path, policy.report)
        except Exception as exc:  # the verdict stands without its report: said, recorded, not raised
            error = f"{type(exc).__name__}: {exc}"
            log.warning("the report of window %s - %s failed: %s", start, end, error)
    rec = window_record(model, version, reference, start, end, assessment.drift, assessment.quality,
                        assessment.verdict, str(written) if written else None, judged_at, estimate)
    rec = rec.model_copy(update={"id": history.record(rec)})
    return MonitoredWindow(assessment=assessment, record=rec, report_path=written, report_error=error)


def verdict_markdown(model: str, reference: str, start: datetime, end: datetime, a: WindowAssessment) -> str:
    """The window's verdict as markdown (for a Prefect artifact)."""
    v = a.verdict
    state = "ALARM" if v.alarm else {"drift": "drifted", "ok": "no drift", "too_few_rows": "too few rows"}[v.status]
    lines = [f"## Monitoring `{model}` vs `{reference}`: **{state}**", "",
             f"Window {start.isoformat()} - {end.isoformat()}, {v.rows} rows; drifted {len(v.drifted_features)} of "
             f"{v.judged_features} features ({v.share_drifted:.0%}); streak {v.streak}/{v.persistence}; "
             f"data quality: {'ALARM' if v.data_quality_alarm else 'ok'}", ""]
    lines += [f"- {r}" for r in v.reasons + v.data_quality_problems]
    lines += ["", "| feature | method | score | threshold | drifted |", "|---|---|---|---|---|"]
    cols = [*a.drift.columns, *([a.drift.prediction] if a.drift.prediction else [])]
    for c in cols:
        score = "-" if c.score is None else f"{c.score:.4g}"
        flag = "yes" if c.column in v.drifted_features or (c.column == "prediction" and v.prediction_drifted) else ""
        lines.append(f"| {c.column} | {c.method} | {score} | {c.threshold:g} | {flag or c.note} |")
    return "\n".join(lines)
