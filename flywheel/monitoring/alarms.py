"""Alarm discipline: when a judged window raises the drift alarm. Pure: verdicts in, a verdict out.

Rules, each in `AlarmSettings` (configs/monitoring.yaml `alarm:`), applied in this order:
1. minimum sample: a window under `min_rows` rows is "too_few_rows". It never raises an alarm (drift or
   data quality), and it neither extends nor breaks a run of drifted windows: it could not tell.
2. false discovery rate: the per-column tests that give p-values (KS, chi-square, Z: small references)
   are corrected together with Benjamini-Hochberg at `fdr`; a p-value column drifts only if it survives.
   Distance tests (Wasserstein, Jensen-Shannon, PSI) have no p-value to correct: the dataset-level rule
   and persistence keep their noise from raising alarms.
3. dataset level: the window is drifted when the share of drifted features (of those that could be
   judged) is >= `drift_share` (Evidently's DriftedColumnsCount rule), or when any of `key_features`
   drifted, or (with `prediction_drift: true`) when the model's prediction distribution drifted.
4. persistence: the alarm is raised while the last `persistence` judged windows (too-few-rows windows
   skipped) were all drifted; one window that is not drifted clears it.
Data quality (quality.py) is a separate verdict, `data_quality_alarm`: recorded and shown, but it is never
a drift alarm and never a reason to retrain (`retrain_signal` is the drift alarm alone).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict

from flywheel.monitoring.config import AlarmSettings
from flywheel.monitoring.drift import ColumnDrift, DriftResult
from flywheel.monitoring.quality import QualityResult
from flywheel.stats import benjamini_hochberg

WindowStatus = Literal["too_few_rows", "ok", "drift"]
TOO_FEW_ROWS: WindowStatus = "too_few_rows"


class WindowVerdict(BaseModel):
    """What one window amounts to, after every rule."""

    model_config = ConfigDict(frozen=True)

    rows: int
    status: WindowStatus
    drifted_features: list[str]  # after the false-discovery-rate control
    tests_drifted: list[str]  # each column's own test alone (Evidently's per-column verdict)
    judged_features: int
    share_drifted: float
    dataset_drift: bool  # the drift_share rule alone
    key_features_drifted: list[str]
    prediction_drifted: bool
    reasons: list[str]
    streak: int  # consecutive drifted windows ending here (too-few-rows windows skipped)
    persistence: int
    alarm: bool  # the drift alarm, after persistence
    data_quality_alarm: bool  # its own verdict: never a drift alarm, never a retraining reason
    data_quality_problems: list[str]

    @property
    def retrain_signal(self) -> bool:
        """What a trigger may act on: the drift alarm. Data-quality problems never count."""
        return self.alarm


def fdr_drifted(columns: Sequence[ColumnDrift], q: float | None) -> set[str]:
    """Names of the judged columns that drifted: distance tests as they are, p-value tests only if they
    survive Benjamini-Hochberg at `q` across all of this window's p-value tests (each alone when None)."""
    judged = [c for c in columns if c.judged]
    out = {c.column for c in judged if c.drifted and not c.p_value}
    tested = [c for c in judged if c.p_value]
    if q is None:
        return out | {c.column for c in tested if c.drifted}
    rejected = benjamini_hochberg([float(c.score) for c in tested], q)  # type: ignore[arg-type]
    # BH decides; a column is still never called drifted against its own test's verdict
    return out | {c.column for c, r in zip(tested, rejected, strict=True) if r and c.drifted}


def trailing_drift(previous: Sequence[WindowStatus]) -> int:
    """How many of the latest judged windows in `previous` (oldest first) were drifted, in a row."""
    n = 0
    for status in reversed(previous):
        if status == TOO_FEW_ROWS:
            continue
        if status != "drift":
            break
        n += 1
    return n


def judge_window(drift: DriftResult, quality: QualityResult | None, previous: Sequence[WindowStatus],
                 policy: AlarmSettings) -> WindowVerdict:
    """The window's verdict under `policy`, given the statuses of the windows before it (oldest first)."""
    tests_drifted = [c.column for c in drift.columns if c.judged and c.drifted]
    drifted = fdr_drifted(drift.columns, policy.fdr)
    judged = sum(c.judged for c in drift.columns)
    ordered = [c.column for c in drift.columns if c.column in drifted]
    share = len(ordered) / judged if judged else 0.0
    dataset_drift = bool(judged) and share >= policy.drift_share
    keys = [k for k in policy.key_features if k in drifted]
    prediction = bool(drift.prediction and drift.prediction.drifted)
    problems = quality.problems if quality is not None else []
    earlier = trailing_drift(previous)
    common = {"rows": drift.rows, "drifted_features": ordered, "tests_drifted": tests_drifted,
              "judged_features": judged, "share_drifted": share, "dataset_drift": dataset_drift,
              "key_features_drifted": keys, "prediction_drifted": prediction, "persistence": policy.persistence,
              "data_quality_problems": problems}

    if drift.rows < policy.min_rows:
        return WindowVerdict(**common, status=TOO_FEW_ROWS, streak=earlier, alarm=False, data_quality_alarm=False,
                             reasons=[f"too few rows: {drift.rows} < {policy.min_rows}; not judged"])
    reasons = []
    if dataset_drift:
        reasons.append(f"{len(ordered)} of {judged} features drifted ({share:.0%} >= {policy.drift_share:.0%})")
    if keys:
        reasons.append(f"key feature(s) drifted: {', '.join(keys)}")
    if prediction and policy.prediction_drift:
        reasons.append("the prediction distribution drifted")
    status: WindowStatus = "drift" if reasons else "ok"
    streak = earlier + 1 if status == "drift" else 0
    alarm = status == "drift" and streak >= policy.persistence
    if status == "drift" and not alarm:
        reasons.append(f"drifted {streak} window(s) in a row; the alarm needs {policy.persistence}")
    return WindowVerdict(**common, status=status, streak=streak, alarm=alarm, data_quality_alarm=bool(problems),
                         reasons=reasons)
