"""One migration path for the continuous-training loop's tables.

Each module that keeps state in the project's database declares its tables on `METADATA` (declaring a
`sa.Table` does no I/O) and lists itself in `TABLE_MODULES`; `upgrade(url)` imports them and creates
whatever is missing, idempotently. Stores call `ensure(engine, tables)` before first use, so a fresh
database works without a separate step; `flywheel db upgrade` (the operations issue's owner-role
migration step) runs the same `upgrade`.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable

import sqlalchemy as sa

from flywheel.db import project_engine

METADATA = sa.MetaData()

# modules declaring tables on METADATA (imported by `upgrade`, never at import time of this module)
TABLE_MODULES: list[str] = [
    "flywheel.webhook", "flywheel.monitoring.history", "flywheel.loopcontrol", "flywheel.rollout_controls",
    "flywheel.trigger_decisions", "flywheel.notify",
]


def ensure(engine: sa.Engine, tables: Iterable[sa.Table]) -> None:
    """Create the given tables where missing (checkfirst): safe to call from several processes at start."""
    METADATA.create_all(engine, tables=list(tables), checkfirst=True)


def upgrade(url: str) -> list[str]:
    """Create every declared table that is missing in the database at `url`; the names of all tables."""
    for module in TABLE_MODULES:
        importlib.import_module(module)
    engine = project_engine(url, "migrations")
    try:
        METADATA.create_all(engine, checkfirst=True)
    finally:
        engine.dispose()
    return sorted(METADATA.tables)
