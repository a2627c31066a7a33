"""Operator requests to a running rollout: today one, `supersede` (`flywheel rollout supersede`).

A rollout runs in its own process (a Prefect flow run, possibly on another machine), so it cannot be
told anything directly. The request is a row of `flywheel_rollout_controls` naming the lock holder it is
for (the flow run: `prefect-flow-run:<id>`); the rollout flow looks for a request naming it between
its steps and before it promotes or rolls back (`check`), and stops without touching traffic or
aliases when it finds one (the command that wrote the request did that). A holder is unique to one
run, so a request never needs to be marked handled: rows are only inserted.
"""

from __future__ import annotations

from datetime import UTC, datetime

import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict

from flywheel.db import project_engine
from flywheel.errors import FlywheelError
from flywheel.migrations import METADATA, ensure

TABLE = "flywheel_rollout_controls"

CONTROLS = sa.Table(
    TABLE,
    METADATA,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("at", sa.DateTime(timezone=False), nullable=False),  # naive UTC, as flywheel/locks.py
    sa.Column("model", sa.String(256), nullable=False, index=True),
    sa.Column("holder", sa.String(256), nullable=False),  # the rollout (lock holder) the request is for
    sa.Column("action", sa.String(32), nullable=False),  # supersede
    sa.Column("version", sa.String(64), nullable=True),  # the version that replaces the running challenger
    sa.Column("actor", sa.String(256), nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
)


class ControlRequest(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: int
    at: datetime
    model: str
    holder: str
    action: str
    version: str | None
    actor: str
    reason: str


class RolloutSuperseded(FlywheelError):
    """The running rollout was superseded by an operator: it stops and leaves traffic and aliases alone."""

    def __init__(self, request: ControlRequest) -> None:
        self.request = request
        super().__init__(
            f"rollout of {request.model!r} superseded by {request.actor} at "
            f"{request.at.isoformat(timespec='seconds')}"
            + (f" in favour of v{request.version}" if request.version else "") + f": {request.reason}"
        )

    def __reduce__(self) -> tuple[type[RolloutSuperseded], tuple[ControlRequest]]:  # a task re-raises a copy
        return (self.__class__, (self.request,))


class RolloutControls:
    """Requests to running rollouts, in the project database at `url` (table created where missing)."""

    def __init__(self, url: str) -> None:
        self._engine = project_engine(url, "rollout controls")
        ensure(self._engine, [CONTROLS])

    def request_supersede(self, model: str, holder: str, version: str | None, actor: str, reason: str,
                          at: datetime | None = None) -> ControlRequest:
        at = (at or datetime.now(UTC)).astimezone(UTC).replace(tzinfo=None)  # wall: shown, never compared
        row = {"at": at, "model": model, "holder": holder, "action": "supersede", "version": version,
               "actor": actor, "reason": reason}
        with self._engine.begin() as conn:
            new_id = conn.execute(sa.insert(CONTROLS).values(**row).returning(CONTROLS.c.id)).scalar_one()
        return ControlRequest(**{**row, "id": new_id, "at": at.replace(tzinfo=UTC)})

    def pending(self, model: str, holder: str) -> ControlRequest | None:
        """The (first) request for the rollout of `model` held by `holder`, if any."""
        q = (sa.select(CONTROLS).where(CONTROLS.c.model == model, CONTROLS.c.holder == holder)
             .order_by(CONTROLS.c.id).limit(1))
        with self._engine.connect() as conn:
            row = conn.execute(q).first()
        if row is None:
            return None
        return ControlRequest(**{**dict(row._mapping), "at": row.at.replace(tzinfo=UTC)})

    def check(self, model: str, holder: str) -> None:
        """RolloutSuperseded when an operator superseded the rollout of `model` held by `holder`."""
        request = self.pending(model, holder)
        if request is not None:
            raise RolloutSuperseded(request)

    def history(self, model: str | None = None) -> list[ControlRequest]:
        q = sa.select(CONTROLS).order_by(CONTROLS.c.id)
        if model is not None:
            q = q.where(CONTROLS.c.model == model)
        with self._engine.connect() as conn:
            return [ControlRequest(**{**dict(r._mapping), "at": r.at.replace(tzinfo=UTC)}) for r in conn.execute(q)]

    def dispose(self) -> None:
        self._engine.dispose()
