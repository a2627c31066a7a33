"""Append-only audit log of model-alias moves (MLflow keeps no alias history).

One table, `flywheel_alias_audit`, on SQLAlchemy 2.0 Core; the same code runs on SQLite and Postgres.
Append-only three times over: this module has no update/delete API; the database itself refuses
UPDATE and DELETE (SQLite: BEFORE triggers raising ABORT; Postgres: a plpgsql trigger function,
plus a TRUNCATE trigger), so a stray script or a manual `psql` session cannot rewrite history; and on
PostgreSQL the triggers belong to the owner role that ran `flywheel db upgrade`, while the application
role holds only INSERT and SELECT on the table (it can neither rewrite rows nor drop the triggers).
The table and its triggers come from the one migration path (`schema_extras` below is its hook).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict

from flywheel import migrations
from flywheel.clock import Clock, WallClock
from flywheel.db import project_engine

TABLE = "flywheel_alias_audit"
APPEND_ONLY_MESSAGE = f"{TABLE} is append-only"


class AuditEntry(BaseModel):
    """One alias move: `alias` went from `from_version` to `to_version` (None = unset)."""

    model_config = ConfigDict(frozen=True)

    id: int
    at: datetime
    model: str
    alias: str
    from_version: str | None
    to_version: str | None
    reason: str
    actor: str
    evidence: dict[str, Any]


def _table(metadata: sa.MetaData) -> sa.Table:
    return sa.Table(
        TABLE,
        metadata,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("model", sa.String(256), nullable=False, index=True),
        sa.Column("alias", sa.String(256), nullable=False),
        sa.Column("from_version", sa.String(64), nullable=True),
        sa.Column("to_version", sa.String(64), nullable=True),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("actor", sa.String(256), nullable=False),
        sa.Column("evidence", sa.Text, nullable=False),  # JSON text: portable across both databases
    )


AUDIT = _table(migrations.METADATA)


def _sqlite_guards() -> list[str]:
    return [
        f"CREATE TRIGGER IF NOT EXISTS {TABLE}_no_{op.lower()} BEFORE {op} ON {TABLE} "
        f"BEGIN SELECT RAISE(ABORT, '{APPEND_ONLY_MESSAGE}: {op} refused'); END"
        for op in ("UPDATE", "DELETE")
    ]


def _postgres_guards() -> list[str]:
    fn = f"{TABLE}_refuse"
    return [
        f"""CREATE OR REPLACE FUNCTION {fn}() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  RAISE EXCEPTION '{APPEND_ONLY_MESSAGE}: % refused', TG_OP USING ERRCODE = 'insufficient_privilege';
END
$$""",
        f"DROP TRIGGER IF EXISTS {TABLE}_no_update_delete ON {TABLE}",
        f"CREATE TRIGGER {TABLE}_no_update_delete BEFORE UPDATE OR DELETE ON {TABLE} "
        f"FOR EACH ROW EXECUTE FUNCTION {fn}()",
        f"DROP TRIGGER IF EXISTS {TABLE}_no_truncate ON {TABLE}",
        f"CREATE TRIGGER {TABLE}_no_truncate BEFORE TRUNCATE ON {TABLE} FOR EACH STATEMENT EXECUTE FUNCTION {fn}()",
    ]


def schema_extras(dialect: str) -> list[str]:
    """The migration hook: the append-only triggers, (re)created by `flywheel db upgrade` as the owner."""
    return _sqlite_guards() if dialect == "sqlite" else _postgres_guards()


def append_only_tables() -> list[str]:
    """The migration hook: tables the application role may only INSERT into and SELECT from."""
    return [TABLE]


class AuditLog:
    """The alias audit log in the database at `url` (created idempotently on first use). A move's `at` is the
    project clock's time (`clock`, from the entry point): liveness, staleness and the volume trigger compare it
    with the project's now."""

    def __init__(self, url: str, clock: Clock | None = None) -> None:
        self.url = url
        self.clock = clock or WallClock()
        self._engine = project_engine(url, "audit log")
        self._table = AUDIT
        self._create()

    def __repr__(self) -> str:
        return f"AuditLog({self._engine.url.render_as_string(hide_password=True)!r})"

    @property
    def engine(self) -> sa.Engine:
        return self._engine

    def _create(self) -> None:
        # SQLite (local profiles): the table and its triggers are made here on first use; PostgreSQL: `ensure`
        # only checks that `flywheel db upgrade` (the owner role) made them
        migrations.ensure(self._engine, [AUDIT])
        if not migrations.managed(self._engine):
            with self._engine.begin() as conn:
                for stmt in _sqlite_guards():
                    conn.execute(sa.text(stmt))

    def append(
        self,
        model: str,
        alias: str,
        from_version: str | None,
        to_version: str | None,
        reason: str,
        actor: str,
        evidence: dict[str, Any] | None = None,
        at: datetime | None = None,
    ) -> AuditEntry:
        """Record one alias move and return it as stored."""
        row = {
            "at": (at or self.clock.now()).astimezone(UTC),
            "model": model,
            "alias": alias,
            "from_version": None if from_version is None else str(from_version),
            "to_version": None if to_version is None else str(to_version),
            "reason": reason,
            "actor": actor,
            "evidence": json.dumps(evidence or {}, sort_keys=True, default=str),
        }
        with self._engine.begin() as conn:
            new_id = conn.execute(sa.insert(self._table).values(**row).returning(self._table.c.id)).scalar_one()
        return self._entry({**row, "id": new_id})

    def entries(self, model: str | None = None, alias: str | None = None) -> list[AuditEntry]:
        """Every recorded move (optionally for one model / alias), oldest first."""
        q = sa.select(self._table).order_by(self._table.c.id)
        if model is not None:
            q = q.where(self._table.c.model == model)
        if alias is not None:
            q = q.where(self._table.c.alias == alias)
        with self._engine.connect() as conn:
            return [self._entry(dict(r._mapping)) for r in conn.execute(q)]

    @staticmethod
    def _entry(row: dict[str, Any]) -> AuditEntry:
        at: datetime = row["at"]
        # SQLite stores no offset: every timestamp written here is UTC
        at = at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)
        evidence = row["evidence"]
        return AuditEntry(**{**row, "at": at, "evidence": json.loads(evidence) if evidence else {}})

    def dispose(self) -> None:
        self._engine.dispose()
