"""Liveness seen from outside the loop: has monitoring run, and have outcomes arrived, recently enough?

The monitoring flow checks liveness inside each run (tasks/triggers.py `check_liveness`), which cannot
notice that monitoring stopped altogether. This check reads only the project database, so anything outside
Prefect can ask it: the service's /metrics (flywheel/monitoring/exporter.py: ages and `flywheel_loop_silent`,
alerted on by deployments/prometheus/alerts.yml), `flywheel loop check` (cron), and the webhook receiver's
/health detail.

The rule is the in-flow one (flywheel/triggers.py `liveness_alarms`, limits in configs/triggers.yaml
`liveness`): monitoring is silent when no window of the model was judged for longer than
`monitoring_max_silence`, outcomes when none of its dataset arrived for longer than `outcomes_max_silence`.
Nothing recorded yet counts from when the model became champion (the alias audit log); a model never
champion and never judged is silent at once. Times are the project's (flywheel/clock.py): `now` comes
from the caller's clock, the records carry the times the loop wrote.

Light on purpose (SQLAlchemy only, tables named rather than imported) so the webhook receiver can use it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal

import sqlalchemy as sa

from flywheel.trigger_policy import Liveness
from flywheel.triggers import liveness_alarms

# the columns this check reads, named rather than imported (their modules pull in pandas)
_WINDOWS = sa.table("flywheel_monitoring_windows", sa.column("model", sa.String), sa.column("judged_at", sa.DateTime))
_OUTCOMES = sa.table("flywheel_outcomes", sa.column("dataset", sa.String),
                     sa.column("arrived_at", sa.DateTime(timezone=True)))
_AUDIT = sa.table("flywheel_alias_audit", sa.column("model", sa.String), sa.column("alias", sa.String),
                  sa.column("at", sa.DateTime(timezone=True)))

What = Literal["monitoring", "outcomes"]


@dataclass(frozen=True)
class Silence:
    """One watched stream: when it last showed life, how long it has been quiet, against which limit."""

    what: What
    last_at: datetime | None  # the newest judged window / outcome arrival; None if never
    age_s: float  # since `last_at`, else since the model became champion; inf when neither is known
    limit_s: float
    silent: bool


@dataclass(frozen=True)
class LoopLiveness:
    model: str
    dataset: str
    champion_since: datetime | None
    monitoring: Silence
    outcomes: Silence
    summaries: tuple[str, ...]  # one line per silent stream (the in-flow alarm's summary)

    @property
    def silent(self) -> bool:
        return self.monitoring.silent or self.outcomes.silent


def judge(model: str, dataset: str, last_monitoring_at: datetime | None, last_outcome_at: datetime | None,
          champion_since: datetime | None, now: datetime, policy: Liveness) -> LoopLiveness:
    """The loop's liveness from what was recorded (pure)."""
    alarms = {a.evidence["silent"]: a for a in liveness_alarms(
        last_monitoring_at, last_outcome_at, now, policy, model=model, watched_since=champion_since)}

    def silence(what: What, last: datetime | None, limit: timedelta) -> Silence:
        start = last or champion_since
        age = (now - start).total_seconds() if start is not None else float("inf")
        return Silence(what, last, age, limit.total_seconds(), what in alarms)

    return LoopLiveness(model, dataset, champion_since,
                        silence("monitoring", last_monitoring_at, policy.monitoring_max_silence),
                        silence("outcomes", last_outcome_at, policy.outcomes_max_silence),
                        tuple(a.summary for a in alarms.values()))


def read(conn: sa.Connection, model: str, dataset: str, now: datetime, policy: Liveness) -> LoopLiveness:
    """Judge the loop of `model` (its outcomes: `dataset`) from the project database. A table that does not
    exist yet holds nothing; only what was known by `now` counts."""
    present = set(sa.inspect(conn).get_table_names())
    naive_now = now.astimezone(UTC).replace(tzinfo=None)
    aware_now = naive_now if conn.dialect.name == "sqlite" else now.astimezone(UTC)  # as each table stores it

    def newest(table: sa.TableClause, column: str, *where: sa.ColumnElement[bool]) -> datetime | None:
        if table.name not in present:
            return None
        return _utc(conn.execute(sa.select(sa.func.max(table.c[column])).where(*where)).scalar_one())

    last_monitoring = newest(_WINDOWS, "judged_at", _WINDOWS.c.model == model, _WINDOWS.c.judged_at <= naive_now)
    last_outcome = newest(_OUTCOMES, "arrived_at", _OUTCOMES.c.dataset == dataset,
                          _OUTCOMES.c.arrived_at <= aware_now)
    # monitoring and outcomes are owed from the first time the model became champion
    champion = None
    if _AUDIT.name in present:
        champion = _utc(conn.execute(sa.select(sa.func.min(_AUDIT.c.at)).where(
            _AUDIT.c.model == model, _AUDIT.c.alias == "champion")).scalar_one())
    return judge(model, dataset, last_monitoring, last_outcome, champion, now, policy)


def _utc(value: datetime | str | None) -> datetime | None:
    """Naive values are UTC (SQLite keeps no offset)."""
    if value is None:
        return None
    if isinstance(value, str):  # an aggregate over SQLite loses the column's type
        value = datetime.fromisoformat(value)
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def describe(s: Silence) -> str:
    if s.age_s == float("inf"):
        return "never"
    hours = s.age_s / 3600
    return f"{hours:.1f} h" if hours < 48 else f"{hours / 24:.1f} d"
