"""The alias audit log: append-only in the API and in the database (SQLite here, Postgres when present)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.exc import DBAPIError

from flywheel import migrations
from flywheel.audit import TABLE, AuditLog
from flywheel.errors import FlywheelError


@pytest.fixture
def audit(tmp_path: Path) -> AuditLog:
    return AuditLog(f"sqlite:///{tmp_path}/sub/flywheel.db")


def _fill(log: AuditLog) -> None:
    log.append("churn", "champion", None, "1", "first model passed absolute gates", "user:a", {"auc": 0.8})
    log.append("churn", "challenger", None, "2", "passed gates", "user:a")
    log.append("other", "champion", None, "1", "first", "user:b")
    log.append("churn", "champion", "1", "2", "promoted", "user:c", {"approved_by": "c"})


def test_append_returns_stored_entry_and_entries_are_ordered(audit: AuditLog) -> None:
    entry = audit.append("churn", "champion", None, "1", "first", "user:a", {"auc": 0.81, "rules": ["x"]})
    assert entry.id == 1 and entry.from_version is None and entry.to_version == "1"
    assert entry.at.tzinfo is not None and entry.at.utcoffset().total_seconds() == 0
    assert entry.evidence == {"auc": 0.81, "rules": ["x"]}
    _fill(audit)
    churn = audit.entries("churn")
    assert [e.id for e in churn] == sorted(e.id for e in churn)
    assert [(e.alias, e.from_version, e.to_version) for e in churn] == [
        ("champion", None, "1"), ("champion", None, "1"), ("challenger", None, "2"), ("champion", "1", "2"),
    ]  # fmt: skip
    assert len(audit.entries()) == 5
    assert [e.to_version for e in audit.entries("churn", alias="challenger")] == ["2"]
    assert audit.entries("missing") == []
    # read back: timezone-aware UTC even though SQLite stores no offset
    assert all(e.at.tzinfo is not None for e in audit.entries())


def test_explicit_time_is_kept_in_utc(audit: AuditLog) -> None:
    at = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    audit.append("m", "champion", None, "1", "r", "a", at=at)
    assert audit.entries("m")[0].at == at


def test_creation_is_idempotent_and_history_survives(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/flywheel.db"
    first = AuditLog(url)
    _fill(first)
    again = AuditLog(url)  # table and triggers exist already: no error, nothing lost
    assert len(again.entries()) == 4
    again.append("churn", "challenger", "2", None, "promoted", "user:c")
    assert len(first.entries("churn")) == 4


def test_no_update_or_delete_api(audit: AuditLog) -> None:
    public = {n for n in dir(audit) if not n.startswith("_")}
    assert not {n for n in public if any(w in n for w in ("update", "delete", "remove", "clear", "truncate"))}


def _assert_refused(log: AuditLog, statement: str) -> None:
    with pytest.raises(DBAPIError, match="append-only"), log.engine.begin() as conn:
        conn.execute(sa.text(statement))


def test_sqlite_refuses_update_and_delete(audit: AuditLog) -> None:
    _fill(audit)
    before = audit.entries()
    _assert_refused(audit, f"UPDATE {TABLE} SET to_version = '9' WHERE id = 1")
    _assert_refused(audit, f"UPDATE {TABLE} SET reason = 'rewritten'")
    _assert_refused(audit, f"DELETE FROM {TABLE} WHERE id = 2")
    _assert_refused(audit, f"DELETE FROM {TABLE}")
    assert audit.entries() == before


def test_unsupported_database_is_named() -> None:
    with pytest.raises(FlywheelError, match="unsupported database"):
        AuditLog("mysql+pymysql://nobody@127.0.0.1:1/none")


# ------------------------------------------------------------------------------------- Postgres


@pytest.fixture
def pg_audit() -> Iterator[AuditLog]:
    from tests.production.conftest import throwaway_database

    with throwaway_database("flywheel_audit", migrate=True) as url:
        log = AuditLog(url)
        try:
            yield log
        finally:
            log.dispose()


@pytest.mark.production
def test_postgres_append_only(pg_audit: AuditLog) -> None:
    _fill(pg_audit)
    migrations.upgrade(pg_audit.url)  # idempotent: function and triggers replaced, rows kept
    AuditLog(pg_audit.url)
    before = pg_audit.entries()
    assert len(before) == 4 and before[0].at.tzinfo is not None
    assert before[0].evidence == {"auc": 0.8}
    # even the owner (here the superuser) is refused by the triggers
    _assert_refused(pg_audit, f"UPDATE {TABLE} SET to_version = '9' WHERE id = {before[0].id}")
    _assert_refused(pg_audit, f"DELETE FROM {TABLE}")
    _assert_refused(pg_audit, f"TRUNCATE {TABLE}")
    assert pg_audit.entries() == before
