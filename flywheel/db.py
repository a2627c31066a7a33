"""The project's own tables (audit log, prediction log, rollout locks) all open their database here."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import sqlalchemy as sa

from flywheel.errors import FlywheelError


def project_engine(url: str, what: str) -> sa.Engine:
    """An engine for SQLite (its folder created) or PostgreSQL; anything else fails naming `what`."""
    parsed = sa.engine.make_url(url)
    backend = parsed.get_backend_name()
    if backend not in ("sqlite", "postgresql"):
        raise FlywheelError(f"{what}: unsupported database {backend!r}; use SQLite or PostgreSQL")
    if backend == "sqlite":
        db = parsed.database
        if db and db != ":memory:" and not db.startswith("file:"):
            Path(db).parent.mkdir(parents=True, exist_ok=True)
        # several processes (service writer, flows, CLI) share the file: wait for a lock instead of failing
        return sa.create_engine(url, connect_args={"timeout": 15})
    return sa.create_engine(url, pool_pre_ping=True)


def naive_utc(dt: datetime) -> datetime:
    """A time as the project's tables store it: naive UTC (SQLite keeps no zone; naive input is taken as UTC)."""
    return dt.astimezone(UTC).replace(tzinfo=None) if dt.tzinfo else dt


def aware_utc(dt: datetime) -> datetime:
    """A stored time read back as timezone-aware UTC."""
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)
