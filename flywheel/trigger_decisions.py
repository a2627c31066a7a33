"""Every trigger decision, fired or suppressed, in `flywheel_trigger_decisions` (the project database).

One row per decision: when (on the project's clock, and the wall time it was recorded), the model, the
signal's kind and event id, the outcome and its reason, the evidence (JSON), when its event was emitted and
the training flow run it started, once known. Rows are inserted, never deleted; the only updates fill
`emitted_at` and `flow_run_id` once, where they are still empty.

`decide_and_record` is the one path from a signal to a recorded decision: it reads the history the rules
need, decides (flywheel/triggers.py) and inserts. Decision ids are deterministic, so when two processes
decide the same signal at once the primary key refuses the second insert; that process reads the history
again and decides again (a duplicate, this time).

Times are stored as naive UTC, as in flywheel/locks.py. SQLAlchemy Core: SQLite and PostgreSQL alike.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa

from flywheel.db import aware_utc, naive_utc, project_engine
from flywheel.errors import FlywheelError
from flywheel.migrations import METADATA, ensure
from flywheel.trigger_policy import TriggerPolicy
from flywheel.triggers import Decision, History, Signal, decide

TABLE = "flywheel_trigger_decisions"

DECISIONS = sa.Table(
    TABLE,
    METADATA,
    sa.Column("id", sa.String(36), primary_key=True),  # uuid5 of (event id, decisions before it): see triggers.py
    sa.Column("at", sa.DateTime(timezone=False), nullable=False, index=True),  # project clock, naive UTC
    sa.Column("recorded_at", sa.DateTime(timezone=False), nullable=False),  # wall clock, naive UTC
    sa.Column("model", sa.String(256), nullable=False, index=True),
    sa.Column("kind", sa.String(32), nullable=False),
    sa.Column("event_id", sa.String(256), nullable=False, index=True),
    sa.Column("occurred", sa.DateTime(timezone=False), nullable=False),
    sa.Column("outcome", sa.String(16), nullable=False),  # fire | suppressed
    sa.Column("suppressed_by", sa.String(16), nullable=True),  # duplicate | disabled | ... | cooldown
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("evidence", sa.Text, nullable=False),  # JSON text: portable across both databases
    sa.Column("emitted_at", sa.DateTime(timezone=False), nullable=True),  # wall time the retrain event went out
    sa.Column("flow_run_id", sa.String(64), nullable=True),  # the training run it started, once known
)


class DecisionConflict(FlywheelError):
    """Another process recorded a decision with the same id first."""



def _decision(row: Any) -> Decision:
    m = dict(row._mapping)
    return Decision(id=m["id"], at=aware_utc(m["at"]), model=m["model"], kind=m["kind"], event_id=m["event_id"],
                    outcome=m["outcome"], reason=m["reason"], suppressed_by=m["suppressed_by"],
                    evidence=json.loads(m["evidence"]) if m["evidence"] else {}, occurred=aware_utc(m["occurred"]),
                    emitted_at=aware_utc(m["emitted_at"]) if m["emitted_at"] else None, flow_run_id=m["flow_run_id"])


class TriggerDecisions:
    """The decisions table in the project database at `url` (created where missing)."""

    def __init__(self, url: str) -> None:
        self._engine = project_engine(url, "trigger decisions")
        ensure(self._engine, [DECISIONS])

    @property
    def engine(self) -> sa.Engine:
        return self._engine

    def history(self, model: str, event_id: str, last_retrain_at: datetime | None = None,
                model_history: bool = True) -> History:
        """What `decide` needs: the model's decisions and every decision about `event_id`. An explicit request
        needs only the latter (`model_history=False`: no cooldown applies), which keeps the webhook's insert
        path one indexed lookup however long the history grows."""
        where = sa.or_(DECISIONS.c.model == model, DECISIONS.c.event_id == event_id) if model_history else (
            DECISIONS.c.event_id == event_id)
        q = sa.select(DECISIONS).where(where).order_by(DECISIONS.c.at, DECISIONS.c.recorded_at)
        with self._engine.connect() as conn:
            decisions = tuple(_decision(r) for r in conn.execute(q))
        return History(decisions=decisions, last_retrain_at=last_retrain_at)

    def record(self, decision: Decision, recorded_at: datetime | None = None) -> Decision:
        """Insert one decision; DecisionConflict if its id is taken (another process decided it first)."""
        row = {"id": decision.id, "at": naive_utc(decision.at),
               "recorded_at": naive_utc(recorded_at or datetime.now(UTC)),  # wall, beside `at` on the project clock
               "model": decision.model, "kind": decision.kind, "event_id": decision.event_id,
               "occurred": naive_utc(decision.occurred), "outcome": decision.outcome,
               "suppressed_by": decision.suppressed_by, "reason": decision.reason,
               "evidence": json.dumps(decision.evidence, sort_keys=True, default=str),
               "flow_run_id": decision.flow_run_id}
        try:
            with self._engine.begin() as conn:
                conn.execute(DECISIONS.insert(), row)  # parameters, not .values(): no statement built per call
        except sa.exc.IntegrityError as exc:
            raise DecisionConflict(f"decision {decision.id} is already recorded") from exc
        return decision

    def decide_and_record(self, signal: Signal, policy: TriggerPolicy, paused: bool | str, now: datetime,
                          last_retrain_at: datetime | None = None, attempts: int = 5) -> Decision:
        """Decide `signal` on the recorded history and record the decision (retried when a concurrent
        decision of the same event id got in first)."""
        for _ in range(attempts):
            history = self.history(signal.model, signal.event_id, last_retrain_at, model_history=signal.automatic)
            decision = decide(signal, history, policy, paused, now)
            try:
                return self.record(decision)
            except DecisionConflict:
                continue
        raise DecisionConflict(f"could not record a decision for event {signal.event_id} after {attempts} attempts")

    def fired_for(self, event_id: str) -> Decision | None:
        """The decision that fired for a signal's event id, if one did (a retry of that signal is its duplicate
        and must re-send this decision's event, not start another)."""
        q = (sa.select(DECISIONS).where(DECISIONS.c.event_id == event_id, DECISIONS.c.outcome == "fire")
             .order_by(DECISIONS.c.at, DECISIONS.c.recorded_at).limit(1))
        with self._engine.connect() as conn:
            row = conn.execute(q).first()
        return _decision(row) if row is not None else None

    def _fill(self, decision_id: str, column: str, value: Any) -> bool:
        col = DECISIONS.c[column]
        with self._engine.begin() as conn:
            done = conn.execute(sa.update(DECISIONS).where(DECISIONS.c.id == decision_id, col.is_(None))
                                .values({column: value}))
        return done.rowcount == 1

    def mark_emitted(self, decision_id: str, at: datetime | None = None) -> bool:
        """Record when the decision's event went out (once)."""
        return self._fill(decision_id, "emitted_at", naive_utc(at or datetime.now(UTC)))  # Prefect's time: wall

    def link_run(self, decision_id: str, flow_run_id: str) -> bool:
        """Record the training flow run the decision started (once)."""
        return self._fill(decision_id, "flow_run_id", str(flow_run_id))

    def get(self, decision_id: str) -> Decision | None:
        with self._engine.connect() as conn:
            row = conn.execute(sa.select(DECISIONS).where(DECISIONS.c.id == decision_id)).first()
        return _decision(row) if row is not None else None

    def decisions(self, model: str | None = None, limit: int = 50) -> list[Decision]:
        """The latest decisions (of one model), newest first."""
        q = sa.select(DECISIONS).order_by(DECISIONS.c.at.desc(), DECISIONS.c.recorded_at.desc()).limit(limit)
        if model is not None:
            q = q.where(DECISIONS.c.model == model)
        with self._engine.connect() as conn:
            return [_decision(r) for r in conn.execute(q)]

    def dispose(self) -> None:
        self._engine.dispose()
