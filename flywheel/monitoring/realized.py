"""Realized performance beside the estimate, per monitoring window, filled in as the outcomes land.

A window is judged the hour it is served, with a label-free estimate (performance.py); its labels arrive
weeks later. Each monitoring run therefore looks back over the model's recorded windows that ended within
`performance.lookback` (configs/monitoring.yaml), joins their served predictions to the outcomes known now
by the one honest rule (`flywheel.outcomes.join_outcomes`: same entity, same feature snapshot, label
arrived after the prediction), and, for every window whose count of labelled rows changed, appends a row to
`flywheel_monitoring_performance`: how many rows joined and, once at least `min_labelled_rows` did, the
realized ROC AUC and accuracy, the estimate on those same rows and its error (`estimate_error`). Rows are
only ever appended, so the history shows how each window's realized figure filled in; the latest row of a
window is its current figure (`PerformanceHistory.latest`).

Pure computation (`assign_windows`, `window_performance`) plus the table's store. Times are naive UTC in
the database, as in history.py; SQLAlchemy Core, SQLite and PostgreSQL alike.
"""

from __future__ import annotations

import math
from datetime import datetime
from typing import Any

import numpy as np
import pandas as pd
import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict

from flywheel import migrations
from flywheel.db import aware_utc, naive_utc, project_engine
from flywheel.monitoring.history import WindowRecord, window_key
from flywheel.monitoring.performance import estimate_error, estimate_performance, realized_performance

PERFORMANCE_TABLE = "flywheel_monitoring_performance"

performance = sa.Table(
    PERFORMANCE_TABLE,
    migrations.METADATA,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("model", sa.String(200), nullable=False),
    sa.Column("version", sa.String(40), nullable=False),
    sa.Column("reference", sa.String(200), nullable=False),
    sa.Column("window_start", sa.DateTime, nullable=False),
    sa.Column("window_end", sa.DateTime, nullable=False),
    sa.Column("evaluated_at", sa.DateTime, nullable=False),  # the project's clock
    sa.Column("outcomes_as_of", sa.DateTime, nullable=False),  # outcomes arrived by then were joined
    sa.Column("scored_rows", sa.Integer, nullable=False),  # the window's served rows with a feature snapshot
    sa.Column("labelled_rows", sa.Integer, nullable=False),  # of them, joined to an outcome
    sa.Column("min_labelled_rows", sa.Integer, nullable=False),
    sa.Column("positive_rate", sa.Float),
    sa.Column("realized_roc_auc", sa.Float),  # null below min_labelled_rows (or one class only)
    sa.Column("realized_accuracy", sa.Float),
    sa.Column("estimated_roc_auc", sa.Float),  # the label-free estimate on the same labelled rows
    sa.Column("estimated_accuracy", sa.Float),
    sa.Column("roc_auc_error", sa.Float),  # estimate - realized
    sa.Column("accuracy_error", sa.Float),
    sa.Column("roc_auc_covered", sa.Boolean),  # the realized value fell inside the estimate's interval
    sa.Column("accuracy_covered", sa.Boolean),
    sa.Index("ix_flywheel_monitoring_performance_window", "model", "reference", "window_start", "window_end"),
)



def _num(value: float | None) -> float | None:
    return None if value is None or math.isnan(value) else float(value)


class WindowPerformance(BaseModel):
    """One evaluation of a window's realized performance, as stored."""

    model_config = ConfigDict(frozen=True)

    id: int | None = None
    model: str
    version: str
    reference: str
    window_start: datetime
    window_end: datetime
    evaluated_at: datetime
    outcomes_as_of: datetime
    scored_rows: int
    labelled_rows: int
    min_labelled_rows: int
    positive_rate: float | None = None
    realized_roc_auc: float | None = None
    realized_accuracy: float | None = None
    estimated_roc_auc: float | None = None
    estimated_accuracy: float | None = None
    roc_auc_error: float | None = None
    accuracy_error: float | None = None
    roc_auc_covered: bool | None = None
    accuracy_covered: bool | None = None

    @property
    def realized(self) -> bool:
        """True once at least `min_labelled_rows` outcomes joined: the realized figures are set."""
        return self.labelled_rows >= self.min_labelled_rows

    @property
    def key(self) -> str:
        return window_key(self.model, self.reference, self.window_start, self.window_end)

    def summary(self) -> str:
        """One line: realized beside the estimate (or how many outcomes are in so far)."""
        if not self.realized:
            return (f"{self.labelled_rows} of {self.scored_rows} rows labelled (realized from "
                    f"{self.min_labelled_rows}): not enough outcomes yet")

        def f(v: float | None) -> str:
            return "n/a" if v is None else f"{v:.3f}"

        return (f"ROC AUC realized {f(self.realized_roc_auc)} vs estimated {f(self.estimated_roc_auc)} "
                f"(error {f(self.roc_auc_error)}), accuracy realized {f(self.realized_accuracy)} vs estimated "
                f"{f(self.estimated_accuracy)} (error {f(self.accuracy_error)}), on {self.labelled_rows} "
                f"labelled of {self.scored_rows} rows")


def assign_windows(at: pd.Series, windows: list[WindowRecord]) -> np.ndarray:
    """Index into `windows` of the window [start, end) holding each time in `at` (-1: none). Windows of one
    version do not overlap; should they, the last recorded one wins."""
    times = pd.to_datetime(at, utc=True)
    out = np.full(len(times), -1)
    for i, w in enumerate(windows):
        inside = (times >= pd.Timestamp(w.window_start)) & (times < pd.Timestamp(w.window_end))
        out[np.asarray(inside)] = i
    return out


def window_performance(window: WindowRecord, scored_rows: int, y: np.ndarray, p: np.ndarray,
                       min_labelled_rows: int, *, evaluated_at: datetime, outcomes_as_of: datetime,
                       n_boot: int = 200, confidence: float = 0.95, seed: int = 0) -> WindowPerformance:
    """The window's realized figures on its `len(y)` joined rows (labels `y`, probabilities `p`), the
    estimate on the same rows and its error; only the counts below `min_labelled_rows`."""
    assert window.version is not None
    n = len(y)
    base: dict[str, Any] = dict(
        model=window.model, version=window.version, reference=window.reference, window_start=window.window_start,
        window_end=window.window_end, evaluated_at=aware_utc(evaluated_at), outcomes_as_of=aware_utc(outcomes_as_of),
        scored_rows=scored_rows, labelled_rows=n, min_labelled_rows=min_labelled_rows)
    if n == 0 or n < min_labelled_rows:
        return WindowPerformance(**base)
    realized = realized_performance(y, p)
    est = estimate_performance(p, n_boot, confidence, seed)
    err = estimate_error(est, realized)
    return WindowPerformance(
        **base, positive_rate=realized.positive_rate, realized_roc_auc=_num(realized.roc_auc),
        realized_accuracy=_num(realized.accuracy), estimated_roc_auc=_num(est.roc_auc.value),
        estimated_accuracy=_num(est.accuracy.value), roc_auc_error=_num(err.roc_auc.error),
        accuracy_error=_num(err.accuracy.error),
        roc_auc_covered=None if math.isnan(realized.roc_auc) else err.roc_auc.covered,
        accuracy_covered=err.accuracy.covered)


class PerformanceHistory:
    """`flywheel_monitoring_performance` in the project database at `url` (created where missing)."""

    def __init__(self, url: str) -> None:
        self._engine = project_engine(url, "monitoring performance")
        migrations.ensure(self._engine, [performance])

    def close(self) -> None:
        self._engine.dispose()

    def record(self, rec: WindowPerformance) -> int:
        """Append one evaluation; its id. Rows are never updated or deleted."""
        row = rec.model_dump(exclude={"id"})
        for key in ("window_start", "window_end", "evaluated_at", "outcomes_as_of"):
            row[key] = naive_utc(row[key])
        with self._engine.begin() as conn:
            return int(conn.execute(performance.insert().values(**row)).inserted_primary_key[0])

    def evaluations(self, model: str, reference: str | None = None, ended_since: datetime | None = None
                    ) -> list[WindowPerformance]:
        """Every evaluation of `model`'s windows (one series when `reference` is given; of windows that ended
        at or after `ended_since` when it is given), oldest first."""
        q = sa.select(performance).where(performance.c.model == model)
        if reference is not None:
            q = q.where(performance.c.reference == reference)
        if ended_since is not None:
            q = q.where(performance.c.window_end >= naive_utc(ended_since))
        with self._engine.connect() as conn:
            rows = conn.execute(q.order_by(performance.c.id)).mappings().all()
        out = []
        for r in rows:
            d = dict(r)
            for key in ("window_start", "window_end", "evaluated_at", "outcomes_as_of"):
                d[key] = aware_utc(d[key])
            out.append(WindowPerformance.model_validate(d))
        return out

    def latest(self, model: str, reference: str | None = None, ended_since: datetime | None = None
               ) -> dict[str, WindowPerformance]:
        """Window key -> its latest evaluation (its current realized figure)."""
        return {e.key: e for e in self.evaluations(model, reference, ended_since)}


def realized_reading(rec: WindowPerformance | None) -> Any:
    """The evaluation as the trigger rule reads a realized figure (`Performance`); None until realized."""
    from flywheel.monitoring.performance import Performance

    if rec is None or not rec.realized:
        return None
    nan = float("nan")
    return Performance(roc_auc=nan if rec.realized_roc_auc is None else rec.realized_roc_auc,
                       accuracy=nan if rec.realized_accuracy is None else rec.realized_accuracy,
                       n=rec.labelled_rows, positive_rate=rec.positive_rate or 0.0)


def refresh_realized(history_url: str, log_url: str, outcomes_url: str, dataset: Any, model: str, now: datetime,
                     lookback: Any, min_labelled_rows: int, *, n_boot: int = 200, confidence: float = 0.95,
                     seed: int = 0, evaluated_at: datetime | None = None) -> list[WindowPerformance]:
    """Join the served predictions of `model`'s windows that ended within `lookback` of `now` to the
    outcomes known at `now` (arrived by then); append an evaluation (dated `evaluated_at`, default `now`)
    for each window whose labelled count changed. The new evaluations, oldest window first. Windows judged
    against a file (no registered version) have no served predictions and are left out."""
    from flywheel.monitoring.history import MonitoringHistory
    from flywheel.monitoring.serving import read_served_predictions
    from flywheel.outcomes import join_outcomes, read_outcomes

    if dataset.outcomes is None:
        return []
    history = MonitoringHistory(history_url)
    try:
        windows = [w for w in history.windows(model, ended_since=now - lookback)
                   if w.version is not None and w.rows > 0 and w.window_start < now]
    finally:
        history.close()
    if not windows:
        return []
    # every arrival of the snapshots that had one since the oldest window began: the join needs each
    # snapshot's FIRST arrival to refuse a label that was known before the prediction
    outcomes = read_outcomes(outcomes_url, dataset, as_of=now, arrived_since=min(w.window_start for w in windows))
    perf = PerformanceHistory(history_url)
    updates: list[WindowPerformance] = []
    try:
        latest = perf.latest(model, ended_since=now - lookback)
        for version in sorted({str(w.version) for w in windows}):
            series = sorted((w for w in windows if w.version == version), key=lambda w: w.window_start)
            served = read_served_predictions(log_url, model, version, series[0].window_start,
                                             max(w.window_end for w in series))
            served["_window"] = assign_windows(served["at"], series)
            served = served[served["_window"] >= 0]
            scored = served.groupby("_window").size()
            joined = join_outcomes(served, outcomes, as_of=now)
            for i, w in enumerate(series):
                rows = joined[joined["_window"] == i]
                before = latest.get(w.key)
                if (before.labelled_rows if before else 0) == len(rows):
                    continue  # nothing new for this window
                rec = window_performance(w, int(scored.get(i, 0)), rows["y"].to_numpy(int),
                                         rows["probability"].to_numpy(float), min_labelled_rows,
                                         evaluated_at=evaluated_at or now,
                                         outcomes_as_of=now, n_boot=n_boot, confidence=confidence, seed=seed)
                updates.append(rec.model_copy(update={"id": perf.record(rec)}))
    finally:
        perf.close()
    return sorted(updates, key=lambda r: r.window_start)
