"""One migration path for the project's own tables (audit log, prediction log, locks, loop state, ...).

Each module that keeps state in the project's database declares its tables on `METADATA` (declaring a
`sa.Table` does no I/O) and lists itself in `TABLE_MODULES`; a module may also define
`schema_extras(dialect) -> [SQL]` (e.g. the audit log's append-only triggers) and
`append_only_tables() -> [names]` (tables the application role may only INSERT into and SELECT from).

Who creates the schema depends on the database:
- SQLite (the local and ci profiles): stores call `ensure(engine, tables)` before first use, which creates
  what is missing, so a fresh laptop works without a separate step.
- PostgreSQL (the production profile): the schema belongs to an owner role. `flywheel db upgrade` runs
  `upgrade(owner_url, grant_to=[app roles])`: it creates the tables and the triggers, records `REVISION` in
  `flywheel_schema_version` and grants the application role what it needs (on the audit log: INSERT and
  SELECT only). The application never creates or alters anything there: `ensure` checks the recorded
  revision and fails naming `flywheel db upgrade` when it is behind.

A table that gained a column gets it added (`ALTER TABLE ... ADD COLUMN`) when the new column is nullable:
additive changes only, so an older process reading the table keeps working (a database at a newer revision
is accepted). A new NOT NULL column cannot be added this way and fails naming the table and the column.
Change a table: bump `REVISION` and set `SCHEMA_DIGEST` (tests/unit/test_migrations.py says the new value).
"""

from __future__ import annotations

import getpass
import hashlib
import importlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import sqlalchemy as sa

from flywheel.db import project_engine
from flywheel.errors import FlywheelError

METADATA = sa.MetaData()

# modules declaring tables on METADATA (imported by `upgrade`, never at import time of this module)
TABLE_MODULES: list[str] = [
    "flywheel.audit", "flywheel.locks",
    "flywheel.predictionlog", "flywheel.outcomes", "flywheel.webhook", "flywheel.monitoring.history",
    "flywheel.monitoring.realized",
    "flywheel.loopcontrol", "flywheel.rollout_controls", "flywheel.trigger_decisions", "flywheel.notify",
    "flywheel.version_claims",
]
# the schema revision this code needs; `flywheel db upgrade` records it in VERSION_TABLE
REVISION = 3
# digest of the declared tables at REVISION (tests/unit/test_migrations.py fails when they drift apart)
SCHEMA_DIGEST = "4722de27a9a5dfc4"
VERSION_TABLE = "flywheel_schema_version"
UPGRADE_COMMAND = "flywheel db upgrade"

_VERSION = sa.Table(
    VERSION_TABLE, sa.MetaData(),  # not on METADATA: it records the schema rather than being part of it
    sa.Column("revision", sa.Integer, primary_key=True),
    sa.Column("digest", sa.String(64), nullable=False),
    sa.Column("upgraded_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("upgraded_by", sa.String(256), nullable=False),
)


class SchemaNotReady(FlywheelError):
    """The database's schema was not made (or not brought up to date) by `flywheel db upgrade`."""


def managed(engine: sa.Engine) -> bool:
    """True where the schema belongs to the owner role's migration step (PostgreSQL), not to the app."""
    return engine.dialect.name != "sqlite"


def ensure(engine: sa.Engine, tables: Iterable[sa.Table]) -> None:
    """Before a store's first use. SQLite: create the given tables where missing and add the nullable columns
    an existing table lacks (safe from several processes at start). PostgreSQL: create nothing; check that
    `flywheel db upgrade` brought the database to REVISION."""
    tables = list(tables)
    if managed(engine):
        require_revision(engine)
        return
    METADATA.create_all(engine, tables=tables, checkfirst=True)
    for table in tables:
        add_missing_columns(engine, table)


def _where(engine: sa.Engine) -> str:
    return engine.url.render_as_string(hide_password=True)


def database_revision(engine: sa.Engine) -> int | None:
    """The revision `flywheel db upgrade` recorded in this database; None when it never ran there.
    An unreachable database fails with one clear error naming it."""
    try:
        with engine.connect() as conn:
            if not sa.inspect(conn).has_table(VERSION_TABLE):
                return None
            return conn.execute(sa.select(sa.func.max(_VERSION.c.revision))).scalar()
    except sa.exc.OperationalError as exc:
        reason = str(getattr(exc, "orig", exc)).strip().splitlines()[0]
        raise FlywheelError(f"project database {_where(engine)} is unreachable: {reason}") from None


def require_revision(engine: sa.Engine) -> int:
    """The database's revision, if it is REVISION or newer (additive: newer is fine); else SchemaNotReady."""
    found = database_revision(engine)
    if found is None:
        raise SchemaNotReady(
            f"project database {_where(engine)} has no Flywheel schema: the application role does not create "
            f"tables in production. Run `{UPGRADE_COMMAND}` as the owner role first (see README, Production profile)")
    if found < REVISION:
        raise SchemaNotReady(
            f"project database {_where(engine)} is at schema revision {found}, this Flywheel needs {REVISION}: "
            f"run `{UPGRADE_COMMAND}` as the owner role")
    return found


def add_missing_columns(bind: sa.Engine | sa.Connection, table: sa.Table) -> list[str]:
    """`ALTER TABLE ADD COLUMN` for each nullable column of `table` the database lacks; the names added."""
    present = {c["name"] for c in sa.inspect(bind).get_columns(table.name)}
    added = []
    for column in table.columns:
        if column.name in present:
            continue
        if not column.nullable or column.primary_key:
            raise FlywheelError(f"table {table.name}: column {column.name!r} is missing and NOT NULL; "
                                "it cannot be added in place")
        kind = column.type.compile(dialect=bind.dialect)
        statement = sa.text(f'ALTER TABLE {table.name} ADD COLUMN "{column.name}" {kind}')
        if isinstance(bind, sa.Connection):  # inside upgrade's transaction (its advisory lock serialises it)
            bind.execute(statement)
        else:
            try:
                with bind.begin() as conn:
                    conn.execute(statement)
            except (sa.exc.OperationalError, sa.exc.ProgrammingError):
                # another process added it meanwhile ("duplicate column"): fine if it is there now
                if column.name not in {c["name"] for c in sa.inspect(bind).get_columns(table.name)}:
                    raise
        added.append(column.name)
    return added


def _modules() -> list:
    return [importlib.import_module(m) for m in TABLE_MODULES]


def schema_digest() -> str:
    """A digest of every declared table (names, columns, types, nullability, indexes)."""
    _modules()
    lines = []
    for table in sorted(METADATA.tables.values(), key=lambda t: t.name):
        for c in table.columns:
            lines.append(f"{table.name}.{c.name}:{c.type!r}:{c.nullable}:{c.primary_key}")
        lines.extend(sorted(f"{table.name} index {sorted(col.name for col in ix.columns)}" for ix in table.indexes))
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]


@dataclass
class UpgradeReport:
    database: str
    revision: int
    tables: list[str]
    granted: list[str] = field(default_factory=list)

    def summary(self) -> str:
        roles = ", ".join(self.granted) if self.granted else "none"
        return (f"{self.database}: schema at revision {self.revision} ({len(self.tables)} tables); "
                f"application roles granted: {roles}")


def upgrade(url: str, grant_to: Iterable[str] = ()) -> list[str]:
    """Create or update every declared table, its triggers and the revision record in the database at `url`
    (run as the owner role); the names of all tables. See `upgrade_database` for the grants."""
    return upgrade_database(url, grant_to).tables


def upgrade_database(url: str, grant_to: Iterable[str] = ()) -> UpgradeReport:
    """The migration step, in one transaction: tables, added columns, each module's extras (triggers), the
    revision row; then, on PostgreSQL, the application roles' privileges. Idempotent."""
    modules = _modules()
    roles = [r for r in dict.fromkeys(grant_to) if r]
    engine = project_engine(url, "migrations")
    dialect = engine.dialect.name
    if roles and dialect == "sqlite":
        raise FlywheelError("database roles exist only on PostgreSQL: --grant-to does not apply to SQLite")
    try:
        with engine.begin() as conn:
            if dialect == "postgresql":  # two upgrades at once (two deploy jobs) wait for each other
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(hashtext('flywheel_schema_upgrade'))"))
            METADATA.create_all(conn, checkfirst=True)
            for table in METADATA.sorted_tables:
                add_missing_columns(conn, table)
                for index in table.indexes:  # create_all skips the indexes of a table that already exists
                    index.create(conn, checkfirst=True)
            for module in modules:
                for statement in getattr(module, "schema_extras", lambda _d: [])(dialect):
                    conn.execute(sa.text(statement))
            _VERSION.create(conn, checkfirst=True)
            if conn.execute(sa.select(_VERSION.c.revision).where(_VERSION.c.revision == REVISION)).first() is None:
                conn.execute(_VERSION.insert().values(revision=REVISION, digest=SCHEMA_DIGEST,
                                                      upgraded_at=datetime.now(UTC), upgraded_by=_who(conn)))
            append_only = {n for m in modules for n in getattr(m, "append_only_tables", list)()}
            for role in roles:
                _grant(conn, role, append_only)
    except sa.exc.OperationalError as exc:
        reason = str(getattr(exc, "orig", exc)).strip().splitlines()[0]
        raise FlywheelError(f"{UPGRADE_COMMAND}: database {_where(engine)} is unreachable: {reason}") from None
    except sa.exc.ProgrammingError as exc:
        reason = str(getattr(exc, "orig", exc)).strip().splitlines()[0]
        raise FlywheelError(f"{UPGRADE_COMMAND} on {_where(engine)} failed: {reason} (run it as the role that "
                            "owns the database's tables: the owner URL, not the application's)") from None
    finally:
        engine.dispose()
    return UpgradeReport(_where(engine), REVISION, sorted(METADATA.tables), roles)


def application_roles(owner_url: str, app_urls: Iterable[str]) -> list[str]:
    """The users of `app_urls` that open the same PostgreSQL database as `owner_url` under another name than
    the owner's: the roles the migration step grants row access to. SQLite has no roles: none."""
    owner = sa.engine.make_url(owner_url)
    if owner.get_backend_name() != "postgresql":
        return []
    roles = []
    for raw in app_urls:
        app = sa.engine.make_url(raw)
        same_db = (app.get_backend_name(), app.host, app.port or 5432, app.database) == (
            "postgresql", owner.host, owner.port or 5432, owner.database)
        if same_db and app.username and app.username != owner.username:
            roles.append(app.username)
    return list(dict.fromkeys(roles))


def _who(conn: sa.Connection) -> str:
    if conn.dialect.name == "postgresql":
        return str(conn.execute(sa.text("SELECT current_user")).scalar())
    return f"user:{getpass.getuser()}"


def _grant(conn: sa.Connection, role: str, append_only: set[str]) -> None:
    """Least privilege for an application role: rows in the project's tables, INSERT and SELECT only on the
    append-only ones, the sequences their ids come from, and nothing on the schema itself (no CREATE, no
    ALTER, no DROP, no TRIGGER: the tables and triggers belong to the owner)."""
    exists = conn.execute(sa.text("SELECT 1 FROM pg_roles WHERE rolname = :r"), {"r": role}).first()
    if exists is None:
        raise FlywheelError(f"{UPGRADE_COMMAND}: role {role!r} does not exist; create it first "
                            f"(CREATE ROLE {role} LOGIN PASSWORD '...')")
    quoted = conn.dialect.identifier_preparer.quote
    r = quoted(role)
    conn.execute(sa.text(f"GRANT USAGE ON SCHEMA public TO {r}"))
    conn.execute(sa.text(f"GRANT SELECT ON {VERSION_TABLE} TO {r}"))
    for table in METADATA.sorted_tables:
        t = quoted(table.name)
        conn.execute(sa.text(f"REVOKE ALL ON {t} FROM {r}"))
        rights = "SELECT, INSERT" if table.name in append_only else "SELECT, INSERT, UPDATE, DELETE"
        conn.execute(sa.text(f"GRANT {rights} ON {t} TO {r}"))
        for column in table.primary_key.columns:
            if not column.autoincrement or not isinstance(column.type, sa.Integer):
                continue
            seq = conn.execute(sa.text("SELECT pg_get_serial_sequence(:t, :c)"),
                               {"t": table.name, "c": column.name}).scalar()
            if seq:  # nextval for inserts; setval would need UPDATE, which is not granted
                conn.execute(sa.text(f"GRANT USAGE ON SEQUENCE {seq} TO {r}"))
