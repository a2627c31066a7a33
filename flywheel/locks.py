"""One rollout at a time per model: a lease lock held in the project database, not in memory.

Table `flywheel_rollout_locks` holds at most one row per model (the primary key makes the insert
the arbiter: two rollouts racing on the same model, in two processes or on two hosts, cannot both
insert). A lock carries a lease: a rollout that crashed without releasing it is taken over once the
lease has expired, and the takeover is recorded in `flywheel_rollout_lock_events` (acquired,
refused, renewed, released, expired, superseded) so the history shows who held what and what was cut
short. An operator superseding a running rollout takes its lock while the lease runs (`take_over`).

Times are stored as naive UTC (`TIMESTAMP WITHOUT TIME ZONE`): SQLite keeps no offset and Postgres
would otherwise convert naive values through the session time zone. SQLAlchemy Core only, so the same
code runs on SQLite and Postgres. Leases are on the wall clock, whatever the project clock: they are
machinery between processes (a lease of `lease_s` wall seconds), like Prefect's concurrency slots.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict

from flywheel import migrations
from flywheel.db import aware_utc, naive_utc, project_engine
from flywheel.errors import FlywheelError

LOCKS_TABLE = "flywheel_rollout_locks"
EVENTS_TABLE = "flywheel_rollout_lock_events"


class RolloutLocked(FlywheelError):
    """Another rollout of the same model holds the lock."""

    def __init__(self, model: str, holder: str, acquired_at: datetime, expires_at: datetime) -> None:
        self.model, self.holder, self.acquired_at, self.expires_at = model, holder, acquired_at, expires_at
        super().__init__(
            f"a rollout of model {model!r} is already in progress (lock held by {holder} since "
            f"{acquired_at.isoformat()}, lease until {expires_at.isoformat()}); wait for it to finish, or "
            "abort it with `flywheel rollout rollback`"
        )


class LockLost(FlywheelError):
    """The holder no longer holds the lock (its lease expired and someone else took it)."""


class LockInfo(BaseModel):
    model_config = ConfigDict(frozen=True)

    model: str
    holder: str
    acquired_at: datetime
    expires_at: datetime
    took_over_from: str | None = None  # the holder whose expired lease this acquisition replaced


class LockEvent(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: int
    at: datetime
    model: str
    holder: str
    event: str  # acquired | refused | renewed | released | expired | superseded
    detail: str



def _tables(metadata: sa.MetaData) -> tuple[sa.Table, sa.Table]:
    locks = sa.Table(
        LOCKS_TABLE, metadata,
        sa.Column("model", sa.String(256), primary_key=True),
        sa.Column("holder", sa.String(256), nullable=False),
        sa.Column("acquired_at", sa.DateTime(timezone=False), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=False), nullable=False),
    )
    events = sa.Table(
        EVENTS_TABLE, metadata,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("at", sa.DateTime(timezone=False), nullable=False),
        sa.Column("model", sa.String(256), nullable=False, index=True),
        sa.Column("holder", sa.String(256), nullable=False),
        sa.Column("event", sa.String(32), nullable=False),
        sa.Column("detail", sa.Text, nullable=False),
    )
    return locks, events


LOCKS, EVENTS = _tables(migrations.METADATA)


class RolloutLocks:
    """Per-model rollout locks in the database at `url` (tables through the one migration path)."""

    def __init__(self, url: str) -> None:
        self._engine = project_engine(url, "rollout locks")
        self.locks, self.events = LOCKS, EVENTS
        migrations.ensure(self._engine, [LOCKS, EVENTS])

    def _event(self, conn: sa.Connection, at: datetime, model: str, holder: str, event: str, detail: str) -> None:
        conn.execute(self.events.insert().values(at=naive_utc(at), model=model, holder=holder, event=event,
                                                 detail=detail))

    def _row(self, conn: sa.Connection, model: str) -> sa.Row | None:
        return conn.execute(sa.select(self.locks).where(self.locks.c.model == model)).first()

    def acquire(self, model: str, holder: str, lease_s: float, now: datetime | None = None) -> LockInfo:
        """Take the lock on `model`, or take over an expired one; RolloutLocked if someone holds it."""
        now = naive_utc(now or datetime.now(UTC))
        expires = now + timedelta(seconds=lease_s)
        try:
            with self._engine.begin() as conn:
                conn.execute(self.locks.insert().values(model=model, holder=holder, acquired_at=now,
                                                        expires_at=expires))
                self._event(conn, now, model, holder, "acquired", f"lease {lease_s:g}s")
            return LockInfo(model=model, holder=holder, acquired_at=aware_utc(now), expires_at=aware_utc(expires))
        except sa.exc.IntegrityError:
            pass  # held (or left behind by a crashed rollout): look at its lease
        with self._engine.begin() as conn:
            row = self._row(conn, model)
            if row is None:  # released between our insert and this read: try once more from the top
                return self.acquire(model, holder, lease_s, aware_utc(now))
            if row.expires_at >= now:
                self._event(conn, now, model, holder, "refused", f"held by {row.holder} until {row.expires_at}")
                refused = RolloutLocked(model, row.holder, aware_utc(row.acquired_at), aware_utc(row.expires_at))
            else:
                # compare-and-set on the expired row: of two rollouts taking over at once, one wins
                done = conn.execute(
                    self.locks.update()
                    .where(self.locks.c.model == model, self.locks.c.holder == row.holder,
                           self.locks.c.expires_at == row.expires_at)
                    .values(holder=holder, acquired_at=now, expires_at=expires)
                )
                if done.rowcount == 1:
                    self._event(conn, now, model, row.holder, "expired",
                                f"lease of {row.holder} (acquired {row.acquired_at}) expired at {row.expires_at}; "
                                f"taken over by {holder}")
                    self._event(conn, now, model, holder, "acquired", f"lease {lease_s:g}s (took over {row.holder})")
                    return LockInfo(model=model, holder=holder, acquired_at=aware_utc(now),
                                    expires_at=aware_utc(expires), took_over_from=row.holder)
                refused = None
        if refused is not None:
            raise refused
        return self.acquire(model, holder, lease_s, aware_utc(now))  # lost the takeover race: re-read

    def renew(self, model: str, holder: str, lease_s: float, now: datetime | None = None) -> LockInfo:
        """Extend the lease; LockLost if `holder` no longer holds the lock."""
        now = naive_utc(now or datetime.now(UTC))
        expires = now + timedelta(seconds=lease_s)
        with self._engine.begin() as conn:
            done = conn.execute(self.locks.update().where(self.locks.c.model == model, self.locks.c.holder == holder)
                                .values(expires_at=expires))
            if done.rowcount != 1:
                current = self._row(conn, model)
                raise LockLost(f"rollout lock on {model!r} is no longer held by {holder} "
                               f"(now: {current.holder if current else 'nobody'}); stopping")
            row = self._row(conn, model)
            self._event(conn, now, model, holder, "renewed", f"until {expires}")
        assert row is not None
        return LockInfo(model=model, holder=holder, acquired_at=aware_utc(row.acquired_at),
                        expires_at=aware_utc(expires))

    def take_over(self, model: str, from_holder: str, holder: str, lease_s: float, reason: str,
                  now: datetime | None = None) -> LockInfo:
        """Take the lock from `from_holder` while its lease runs (an operator superseding a rollout); LockLost
        when `from_holder` no longer holds it. Recorded as `superseded` (for `from_holder`) and `acquired`.
        The rollout that held it learns at its next renewal (LockLost) or control check."""
        now = naive_utc(now or datetime.now(UTC))
        expires = now + timedelta(seconds=lease_s)
        with self._engine.begin() as conn:
            done = conn.execute(self.locks.update().where(self.locks.c.model == model,
                                                          self.locks.c.holder == from_holder)
                                .values(holder=holder, acquired_at=now, expires_at=expires))
            if done.rowcount != 1:
                current = self._row(conn, model)
                raise LockLost(f"rollout lock on {model!r} is no longer held by {from_holder} "
                               f"(now: {current.holder if current else 'nobody'})")
            self._event(conn, now, model, from_holder, "superseded", f"taken over by {holder}: {reason}")
            self._event(conn, now, model, holder, "acquired", f"lease {lease_s:g}s (superseded {from_holder})")
        return LockInfo(model=model, holder=holder, acquired_at=aware_utc(now), expires_at=aware_utc(expires),
                        took_over_from=from_holder)

    def release(self, model: str, holder: str, now: datetime | None = None) -> bool:
        """Drop the lock if `holder` holds it; False when it did not (expired and taken over)."""
        now = naive_utc(now or datetime.now(UTC))
        with self._engine.begin() as conn:
            done = conn.execute(self.locks.delete().where(self.locks.c.model == model, self.locks.c.holder == holder))
            if done.rowcount == 1:
                self._event(conn, now, model, holder, "released", "")
        return done.rowcount == 1

    def current(self, model: str) -> LockInfo | None:
        with self._engine.connect() as conn:
            row = self._row(conn, model)
        if row is None:
            return None
        return LockInfo(model=row.model, holder=row.holder, acquired_at=aware_utc(row.acquired_at),
                        expires_at=aware_utc(row.expires_at))

    def history(self, model: str | None = None) -> list[LockEvent]:
        q = sa.select(self.events).order_by(self.events.c.id)
        if model is not None:
            q = q.where(self.events.c.model == model)
        with self._engine.connect() as conn:
            return [LockEvent(**{**dict(r._mapping), "at": aware_utc(r.at)}) for r in conn.execute(q)]

    def dispose(self) -> None:
        self._engine.dispose()
