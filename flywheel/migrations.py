"""One migration path for the continuous-training loop's tables.

Each module that keeps state in the project's database declares its tables on `METADATA` (declaring a
`sa.Table` does no I/O) and lists itself in `TABLE_MODULES`; `upgrade(url)` imports them and creates
whatever is missing, idempotently. Stores call `ensure(engine, tables)` before first use, so a fresh
database works without a separate step; `flywheel db upgrade` (the operations issue's owner-role
migration step) runs the same `upgrade`.

A table that gained a column since a database was created gets it added (`ALTER TABLE ... ADD COLUMN`)
when the new column is nullable: additive changes only, so an older process reading the table keeps
working. A new NOT NULL column cannot be added this way and fails naming the table and the column.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable

import sqlalchemy as sa

from flywheel.db import project_engine
from flywheel.errors import FlywheelError

METADATA = sa.MetaData()

# modules declaring tables on METADATA (imported by `upgrade`, never at import time of this module)
TABLE_MODULES: list[str] = [
    "flywheel.predictionlog", "flywheel.outcomes", "flywheel.webhook", "flywheel.monitoring.history",
    "flywheel.monitoring.realized",
    "flywheel.loopcontrol", "flywheel.rollout_controls", "flywheel.trigger_decisions", "flywheel.notify",
]


def ensure(engine: sa.Engine, tables: Iterable[sa.Table]) -> None:
    """Create the given tables where missing (checkfirst), and add the nullable columns an existing table
    lacks: safe to call from several processes at start."""
    tables = list(tables)
    METADATA.create_all(engine, tables=tables, checkfirst=True)
    for table in tables:
        add_missing_columns(engine, table)


def add_missing_columns(engine: sa.Engine, table: sa.Table) -> list[str]:
    """`ALTER TABLE ADD COLUMN` for each nullable column of `table` the database lacks; the names added."""
    present = {c["name"] for c in sa.inspect(engine).get_columns(table.name)}
    added = []
    for column in table.columns:
        if column.name in present:
            continue
        if not column.nullable or column.primary_key:
            raise FlywheelError(f"table {table.name}: column {column.name!r} is missing and NOT NULL; "
                                "it cannot be added in place")
        kind = column.type.compile(dialect=engine.dialect)
        try:
            with engine.begin() as conn:
                conn.execute(sa.text(f'ALTER TABLE {table.name} ADD COLUMN "{column.name}" {kind}'))
        except (sa.exc.OperationalError, sa.exc.ProgrammingError):
            # another process added it meanwhile ("duplicate column"): fine if it is there now
            if column.name not in {c["name"] for c in sa.inspect(engine).get_columns(table.name)}:
                raise
        added.append(column.name)
    return added


def upgrade(url: str) -> list[str]:
    """Create every declared table that is missing in the database at `url`; the names of all tables."""
    for module in TABLE_MODULES:
        importlib.import_module(module)
    engine = project_engine(url, "migrations")
    try:
        ensure(engine, METADATA.sorted_tables)
    finally:
        engine.dispose()
    return sorted(METADATA.tables)
