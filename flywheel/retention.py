"""Retention of the tables that grow with traffic: the prediction log and the monitoring history.

What is deleted, and what never is:
- `flywheel_predictions` and `flywheel_prediction_errors`: rows served before the cut-off;
- `flywheel_monitoring_windows` and `flywheel_monitoring_performance`: windows that ended before theirs.
The cut-offs never come closer to now than the monitoring policy's performance `lookback`: the monitoring
flow joins the predictions and windows of that long ago to the outcomes that arrive late (the labels' delay),
so a shorter setting is raised to it and the report says so. The audit log (append-only by design), the
trigger decisions, outcomes, routing and rollout tables are never touched.

Deletes run in chunks of `CHUNK` rows, one short transaction each, so the service's writer and the monitoring
flow are never blocked for long. SQLite reuses the freed pages (the file stops growing instead of shrinking;
`vacuum=True` gives the space back, at the cost of rewriting the file).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import sqlalchemy as sa

from flywheel import migrations
from flywheel.db import project_engine
from flywheel.errors import FlywheelError
from flywheel.schemas import Result

CHUNK = 20_000


class Purge(Result):
    table: str
    before: datetime  # rows older than this were deleted
    deleted: int
    kept: int


class Cutoff(Result):
    """A store's cut-off: the setting's, or the floor the loop needs when that is nearer to now."""

    days: float  # what was applied
    configured_days: float
    floor_days: float
    before: datetime

    @property
    def raised(self) -> bool:
        return self.days > self.configured_days


def cutoff(now: datetime, configured_days: float, floor: timedelta) -> Cutoff:
    """`now` minus the longer of the setting and the floor."""
    if now.tzinfo is None:
        raise FlywheelError("retention needs a tz-aware time")
    days = max(float(configured_days), floor / timedelta(days=1))
    return Cutoff(days=days, configured_days=configured_days, floor_days=floor / timedelta(days=1),
                  before=now - timedelta(days=days))


def _naive(dt: datetime) -> datetime:
    return dt.astimezone(UTC).replace(tzinfo=None)


def _purge(engine: sa.Engine, table: sa.Table, column: sa.Column, before: datetime) -> Purge:
    deleted = 0
    while True:
        with engine.begin() as conn:
            ids = sa.select(table.c.id).where(column < before).order_by(table.c.id).limit(CHUNK).scalar_subquery()
            n = conn.execute(table.delete().where(table.c.id.in_(ids))).rowcount
        deleted += n
        if n < CHUNK:
            break
    with engine.connect() as conn:
        kept = conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one()
    return Purge(table=table.name, before=before, deleted=deleted, kept=kept)


def _vacuum(engine: sa.Engine) -> None:
    if engine.dialect.name == "sqlite":
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql("VACUUM")


def purge_prediction_log(url: str, before: datetime, vacuum: bool = False) -> list[Purge]:
    """Delete the predictions and scoring errors served before `before` (tz-aware)."""
    from flywheel.predictionlog import ERRORS, PREDICTIONS

    engine = project_engine(url, "prediction log")
    try:
        migrations.ensure(engine, [PREDICTIONS, ERRORS])
        # SQLite keeps the writer's UTC times without an offset: compare naive UTC there
        at = _naive(before) if engine.dialect.name == "sqlite" else before.astimezone(UTC)
        out = [_purge(engine, t, t.c.at, at) for t in (PREDICTIONS, ERRORS)]
        if vacuum:
            _vacuum(engine)
        return out
    finally:
        engine.dispose()


def purge_monitoring_history(url: str, before: datetime, vacuum: bool = False) -> list[Purge]:
    """Delete the judged windows (and their realized figures) that ended before `before`."""
    from flywheel.monitoring.history import windows
    from flywheel.monitoring.realized import performance

    engine = project_engine(url, "monitoring history")
    try:
        migrations.ensure(engine, [windows, performance])
        out = [_purge(engine, t, t.c.window_end, _naive(before)) for t in (windows, performance)]  # naive UTC
        if vacuum:
            _vacuum(engine)
        return out
    finally:
        engine.dispose()
