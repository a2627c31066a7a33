"""Monitoring history: one row per judged window in `flywheel_monitoring_windows`, and the trends.

A window belongs to a series: the model and the reference it was judged against (`v<version>` for a
registered version's profile, `profile:<sha>` / `data:<sha>` for a profile file or reference data), so a
new champion starts a new series and its alarms do not inherit the old one's streak. Persistence reads
the windows of the series that ended by the time the window being judged began; judging the same window again
replaces its row, so a re-run does not count twice. Times are stored as naive UTC (SQLite keeps no
offset), through SQLAlchemy Core only: the same code on SQLite and PostgreSQL. The table is declared on
`flywheel.migrations.METADATA` and created by `migrations.ensure` on first use.
"""

from __future__ import annotations

import json
import math
from datetime import datetime
from typing import TYPE_CHECKING, Any

import pandas as pd
import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict

from flywheel import migrations
from flywheel.db import aware_utc, naive_utc, project_engine
from flywheel.monitoring.alarms import WindowStatus, WindowVerdict
from flywheel.monitoring.drift import DriftResult
from flywheel.monitoring.quality import QualityResult

if TYPE_CHECKING:
    from flywheel.monitoring.performance import Estimate

WINDOWS_TABLE = "flywheel_monitoring_windows"

windows = sa.Table(
    WINDOWS_TABLE,
    migrations.METADATA,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("model", sa.String(200), nullable=False),
    sa.Column("version", sa.String(40)),  # None when the reference is not a registered version
    sa.Column("reference", sa.String(200), nullable=False),
    sa.Column("window_start", sa.DateTime, nullable=False),
    sa.Column("window_end", sa.DateTime, nullable=False),
    sa.Column("judged_at", sa.DateTime, nullable=False),
    sa.Column("rows", sa.Integer, nullable=False),
    sa.Column("status", sa.String(20), nullable=False),  # too_few_rows | ok | drift
    sa.Column("dataset_drift", sa.Boolean, nullable=False),
    sa.Column("share_drifted", sa.Float, nullable=False),
    sa.Column("drifted_features", sa.Text, nullable=False),  # JSON list (after the FDR control)
    sa.Column("scores", sa.Text, nullable=False),  # JSON {feature: {method, score, threshold, drifted}}
    sa.Column("prediction_score", sa.Float),
    sa.Column("prediction_drifted", sa.Boolean),
    sa.Column("alarm", sa.Boolean, nullable=False),  # drift alarm after persistence
    sa.Column("streak", sa.Integer, nullable=False),
    sa.Column("data_quality_alarm", sa.Boolean, nullable=False),
    sa.Column("data_quality", sa.Text, nullable=False),  # JSON {problems, features: {...}}
    sa.Column("report_path", sa.Text),
    # the label-free performance estimate of the window's served rows (null: no probabilities, empty window);
    # the realized figures fill in later, in flywheel_monitoring_performance (realized.py)
    sa.Column("estimated_roc_auc", sa.Float),
    sa.Column("estimated_roc_auc_lower", sa.Float),
    sa.Column("estimated_roc_auc_upper", sa.Float),
    sa.Column("estimated_accuracy", sa.Float),
    sa.Column("estimated_accuracy_lower", sa.Float),
    sa.Column("estimated_accuracy_upper", sa.Float),
    sa.Index("ix_flywheel_monitoring_windows_series", "model", "reference", "window_end"),
)


def window_key(model: str, reference: str, start: datetime, end: datetime) -> str:
    """A window's name in trigger event ids and alarms: `<model>:<reference>:<start>/<end>` (ISO, UTC)."""
    return f"{model}:{reference}:{aware_utc(start).isoformat()}/{aware_utc(end).isoformat()}"



class WindowRecord(BaseModel):
    """One judged window, as stored."""

    model_config = ConfigDict(frozen=True)

    id: int | None = None
    model: str
    version: str | None
    reference: str
    window_start: datetime
    window_end: datetime
    judged_at: datetime
    rows: int
    status: WindowStatus
    dataset_drift: bool
    share_drifted: float
    drifted_features: list[str]
    scores: dict[str, dict[str, Any]]
    prediction_score: float | None
    prediction_drifted: bool | None
    alarm: bool
    streak: int
    data_quality_alarm: bool
    data_quality: dict[str, Any]
    report_path: str | None = None
    estimated_roc_auc: float | None = None
    estimated_roc_auc_lower: float | None = None
    estimated_roc_auc_upper: float | None = None
    estimated_accuracy: float | None = None
    estimated_accuracy_lower: float | None = None
    estimated_accuracy_upper: float | None = None

    @property
    def key(self) -> str:
        return window_key(self.model, self.reference, self.window_start, self.window_end)


def _estimate_columns(estimate: Estimate | None) -> dict[str, float | None]:
    if estimate is None:
        return {}

    def num(v: float) -> float | None:
        return None if math.isnan(v) else float(v)

    out = {}
    for name, m in (("roc_auc", estimate.roc_auc), ("accuracy", estimate.accuracy)):
        out.update({f"estimated_{name}": num(m.value), f"estimated_{name}_lower": num(m.lower),
                    f"estimated_{name}_upper": num(m.upper)})
    return out


def window_record(model: str, version: str | None, reference: str, start: datetime, end: datetime,
                  drift: DriftResult, quality: QualityResult, verdict: WindowVerdict,
                  report_path: str | None, judged_at: datetime,
                  estimate: Estimate | None = None) -> WindowRecord:
    """The row of a judged window (pure: nothing is written), judged at `judged_at` (the project clock's)."""
    scores = {c.column: {"method": c.method, "score": c.score, "threshold": c.threshold, "drifted": c.drifted,
                         "note": c.note} for c in drift.columns}
    dq = {"problems": verdict.data_quality_problems, "expectations_run": quality.expectations_run,
          "features": {f.column: f.model_dump(include={"missing_share", "reference_missing_share", "out_of_range",
                                                       "outside_reference", "new_category_share"})
                       for f in quality.features}}
    return WindowRecord(
        model=model, version=version, reference=reference, window_start=aware_utc(start), window_end=aware_utc(end),
        judged_at=judged_at, rows=verdict.rows, status=verdict.status,
        dataset_drift=verdict.dataset_drift, share_drifted=verdict.share_drifted,
        drifted_features=verdict.drifted_features, scores=scores,
        prediction_score=drift.prediction.score if drift.prediction else None,
        prediction_drifted=drift.prediction.drifted if drift.prediction else None,
        alarm=verdict.alarm, streak=verdict.streak, data_quality_alarm=verdict.data_quality_alarm,
        data_quality=dq, report_path=report_path, **_estimate_columns(estimate),
    )


class MonitoringHistory:
    """The judged windows in the project database at `url`."""

    def __init__(self, url: str) -> None:
        self._engine = project_engine(url, "monitoring history")
        migrations.ensure(self._engine, [windows])

    def close(self) -> None:
        self._engine.dispose()

    def record(self, rec: WindowRecord) -> int:
        """Store a judged window (replacing an earlier judgement of the same window); its id."""
        row = rec.model_dump(exclude={"id"})
        row.update(window_start=naive_utc(rec.window_start), window_end=naive_utc(rec.window_end),
                   judged_at=naive_utc(rec.judged_at), drifted_features=json.dumps(rec.drifted_features),
                   scores=json.dumps(rec.scores), data_quality=json.dumps(rec.data_quality, default=str))
        same = sa.and_(windows.c.model == rec.model, windows.c.reference == rec.reference,
                       windows.c.window_start == row["window_start"], windows.c.window_end == row["window_end"])
        with self._engine.begin() as conn:
            conn.execute(windows.delete().where(same))
            return int(conn.execute(windows.insert().values(**row)).inserted_primary_key[0])

    def _records(self, query: sa.Select) -> list[WindowRecord]:
        with self._engine.connect() as conn:
            rows = conn.execute(query).mappings().all()
        out = []
        for r in rows:
            d = dict(r)
            for key in ("window_start", "window_end", "judged_at"):
                d[key] = aware_utc(d[key])
            for key in ("drifted_features", "scores", "data_quality"):
                d[key] = json.loads(d[key])
            out.append(WindowRecord.model_validate(d))
        return out

    def previous(self, model: str, reference: str, before: datetime, limit: int = 100) -> list[WindowRecord]:
        """The series' windows that ended by `before`, oldest first (at most the last `limit`): contiguous
        windows (one ends when the next begins, as the scheduled flow's do) precede each other."""
        q = (sa.select(windows).where(windows.c.model == model, windows.c.reference == reference,
                                      windows.c.window_end <= naive_utc(before))
             .order_by(windows.c.window_end.desc(), windows.c.id.desc()).limit(limit))
        return list(reversed(self._records(q)))

    def last_judged(self, model: str) -> datetime | None:
        """When a window of `model` was last judged (any series); None if never."""
        with self._engine.connect() as conn:
            last = conn.execute(sa.select(sa.func.max(windows.c.judged_at)).where(windows.c.model == model)
                                ).scalar_one()
        return aware_utc(last) if last is not None else None

    def windows(self, model: str, reference: str | None = None, ended_since: datetime | None = None
                ) -> list[WindowRecord]:
        """Every recorded window of `model` (one series when `reference` is given; only those that ended at
        or after `ended_since` when it is given), in time order."""
        q = sa.select(windows).where(windows.c.model == model)
        if reference is not None:
            q = q.where(windows.c.reference == reference)
        if ended_since is not None:
            q = q.where(windows.c.window_end >= naive_utc(ended_since))
        return self._records(q.order_by(windows.c.window_end, windows.c.id))

    def trend(self, model: str, reference: str | None = None) -> pd.DataFrame:
        """One row per window, time-ordered, with what to plot: rows, share drifted, alarm flags, the
        prediction's score and one `score.<feature>` column per feature."""
        recs = self.windows(model, reference)
        return pd.DataFrame([{
            "window_start": r.window_start, "window_end": r.window_end, "reference": r.reference, "rows": r.rows,
            "status": r.status, "share_drifted": r.share_drifted, "alarm": r.alarm, "streak": r.streak,
            "data_quality_alarm": r.data_quality_alarm, "prediction_score": r.prediction_score,
            "estimated_roc_auc": r.estimated_roc_auc, "estimated_accuracy": r.estimated_accuracy,
            **{f"score.{name}": s.get("score") for name, s in r.scores.items()},
        } for r in recs])
