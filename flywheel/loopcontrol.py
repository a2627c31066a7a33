"""Pause and resume the continuous-training loop of a model: `flywheel loop pause|resume|status`.

While a model's loop is paused nothing automatic changes what serves it: registration still registers
and gates candidates but queues them instead of moving the `challenger` alias (tasks/register.py), a
rollout still runs its steps but ends `Held` instead of promoting (flows/rollout.py), and triggers are
recorded as suppressed (`trigger_suppression`, for the trigger layer). Explicit commands still work:
`flywheel rollout promote`, `rollout rollback`, `rollout start`.

State is a history, not a flag: every pause and resume is a row of `flywheel_loop_events` (who, when,
why), and the current state is whatever the model's last row says (`loop_state`, a pure function over
the rows). Rows are only ever inserted: this module has no update or delete. The table is declared on
the one migration path (flywheel/migrations.py) and created on first use.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Literal

import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict

from flywheel.db import aware_utc, naive_utc, project_engine
from flywheel.migrations import METADATA, ensure

TABLE = "flywheel_loop_events"

EVENTS = sa.Table(
    TABLE,
    METADATA,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("at", sa.DateTime(timezone=False), nullable=False),  # naive UTC, as flywheel/locks.py
    sa.Column("model", sa.String(256), nullable=False, index=True),
    sa.Column("action", sa.String(16), nullable=False),  # pause | resume
    sa.Column("actor", sa.String(256), nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
)

Action = Literal["pause", "resume"]


class LoopEvent(BaseModel):
    """One pause or resume of a model's loop."""

    model_config = ConfigDict(frozen=True)

    id: int
    at: datetime
    model: str
    action: Action
    actor: str
    reason: str


class LoopState(BaseModel):
    """Whether a model's loop is paused, and since when, by whom and why (from its last event)."""

    model_config = ConfigDict(frozen=True)

    model: str
    paused: bool
    since: datetime | None = None
    actor: str | None = None
    reason: str | None = None

    def describe(self) -> str:
        if not self.paused:
            return f"loop of {self.model!r} running"
        when = self.since.isoformat(timespec="seconds") if self.since else "?"
        return f"loop paused by {self.actor} at {when}: {self.reason}"


# ------------------------------------------------------------------------------------ pure rules


def loop_state(events: Sequence[LoopEvent], model: str) -> LoopState:
    """The state the events of `model` leave it in: its last event decides (none: running)."""
    mine = [e for e in events if e.model == model]
    if not mine:
        return LoopState(model=model, paused=False)
    last = max(mine, key=lambda e: (e.at, e.id))
    return LoopState(model=model, paused=last.action == "pause", since=last.at, actor=last.actor,
                     reason=last.reason)


def loop_paused(events: Sequence[LoopEvent], model: str) -> bool:
    """True while the loop of `model` is paused."""
    return loop_state(events, model).paused


def trigger_suppression(state: LoopState) -> str | None:
    """Why a retraining/rollout trigger of `state.model` must be recorded as suppressed (None: let it run).

    For the trigger layer: call `LoopControl(url).trigger_suppression(model)` when a trigger fires and,
    when it returns a reason, record the trigger as suppressed with that reason instead of starting a run."""
    if not state.paused:
        return None
    return f"suppressed: {state.describe()}"


# ------------------------------------------------------------------------------------------ store



class LoopControl:
    """The loop events in the project database at `url` (the table is created where missing)."""

    def __init__(self, url: str) -> None:
        self._engine = project_engine(url, "loop control")
        ensure(self._engine, [EVENTS])

    def _append(self, model: str, action: Action, actor: str, reason: str, at: datetime | None) -> LoopEvent:
        # the CLI passes the project clock's now; the wall's is a library default
        row = {"at": naive_utc(at or datetime.now(UTC)), "model": model, "action": action, "actor": actor,
               "reason": reason}
        with self._engine.begin() as conn:
            new_id = conn.execute(sa.insert(EVENTS).values(**row).returning(EVENTS.c.id)).scalar_one()
        return LoopEvent(**{**row, "id": new_id, "at": aware_utc(row["at"])})

    def history(self, model: str | None = None) -> list[LoopEvent]:
        """Every pause and resume (of one model), oldest first."""
        q = sa.select(EVENTS).order_by(EVENTS.c.id)
        if model is not None:
            q = q.where(EVENTS.c.model == model)
        with self._engine.connect() as conn:
            return [LoopEvent(**{**dict(r._mapping), "at": aware_utc(r.at)}) for r in conn.execute(q)]

    def state(self, model: str) -> LoopState:
        return loop_state(self.history(model), model)

    def paused(self, model: str) -> bool:
        return self.state(model).paused

    def trigger_suppression(self, model: str) -> str | None:
        """The reason a trigger of `model` is suppressed now, or None (see the module function)."""
        return trigger_suppression(self.state(model))

    def pause(self, model: str, actor: str, reason: str, at: datetime | None = None) -> tuple[LoopState, bool]:
        """Pause the loop of `model`: (the state, whether this call recorded the pause). Already paused:
        nothing is recorded, and the state says by whom and why it was paused."""
        if not reason.strip():
            raise ValueError("pausing the loop needs a reason (it is recorded)")
        current = self.state(model)
        if current.paused:
            return current, False
        self._append(model, "pause", actor, reason, at)
        return self.state(model), True

    def resume(self, model: str, actor: str, reason: str, at: datetime | None = None) -> tuple[LoopState, bool]:
        """Resume the loop of `model`: (the state, whether this call recorded the resume)."""
        current = self.state(model)
        if not current.paused:
            return current, False
        self._append(model, "resume", actor, reason, at)
        return self.state(model), True

    def dispose(self) -> None:
        self._engine.dispose()
