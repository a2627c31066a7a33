"""Least privilege on PostgreSQL: `flywheel db upgrade`, run as an owner role, makes the schema and the audit
log's append-only triggers; the application role may INSERT and SELECT the audit log and nothing more.

A throwaway database, owner role and application role on the machine's PostgreSQL (127.0.0.1:5432), all
dropped at the end; skipped, saying why, when PostgreSQL is absent.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.exc import DBAPIError

from flywheel import migrations
from flywheel.audit import TABLE, AuditLog
from tests.production.conftest import postgres_or_skip

pytestmark = [pytest.mark.production]
ROOT = Path(__file__).resolve().parents[2]
ADMIN = "host=127.0.0.1 user=postgres dbname=postgres"


@pytest.fixture(scope="module")
def roles() -> Iterator[dict[str, str]]:
    """A database owned by a fresh owner role, and a fresh application role that merely may connect."""
    import psycopg

    postgres_or_skip()
    tag = uuid.uuid4().hex[:10]
    owner, app, db = f"fw_owner_{tag}", f"fw_app_{tag}", f"flywheel_roles_t{tag}"
    with psycopg.connect(ADMIN, autocommit=True) as conn:
        for role in (owner, app):
            conn.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{role}-pw'")
        conn.execute(f'CREATE DATABASE "{db}" OWNER {owner}')
    base = "postgresql+psycopg://{user}:{user}-pw@127.0.0.1:5432/" + db
    try:
        yield {"owner": owner, "app": app, "db": db,
               "owner_url": base.format(user=owner), "app_url": base.format(user=app)}
    finally:
        with psycopg.connect(ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
            conn.execute(f"DROP ROLE IF EXISTS {app}")
            conn.execute(f"DROP ROLE IF EXISTS {owner}")


def _upgrade_cli(roles: dict[str, str]) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "FLYWHEEL_STORES__OWNER_DB_URL": roles["owner_url"],
           "FLYWHEEL_STORES__AUDIT_DB_URL": roles["app_url"], "FLYWHEEL_SERVE__PREDICTION_LOG_URL": roles["app_url"]}
    return subprocess.run([str(Path(sys.executable).parent / "flywheel"), "db", "upgrade", "--profile", "production"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)


@pytest.fixture(scope="module")
def upgraded(roles: dict[str, str]) -> dict[str, str]:
    # before the migration step the application role finds no schema, and says what to run
    with pytest.raises(migrations.SchemaNotReady, match="flywheel db upgrade"):
        AuditLog(roles["app_url"])
    done = _upgrade_cli(roles)
    assert done.returncode == 0, done.stderr
    assert roles["app"] in done.stderr, f"the application role is granted, and named: {done.stderr}"
    return roles


def _as(url: str, statement: str) -> None:
    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text(statement))
    finally:
        engine.dispose()


def test_the_app_role_inserts_and_selects_the_audit_log(upgraded: dict[str, str]) -> None:
    log = AuditLog(upgraded["app_url"])  # checks the revision; creates nothing
    entry = log.append("churn", "champion", None, "1", "first model", "user:a", {"auc": 0.8})
    assert [e.id for e in log.entries("churn")] == [entry.id]
    log.dispose()


def test_the_app_role_uses_the_other_tables_fully(upgraded: dict[str, str]) -> None:
    from flywheel.locks import RolloutLocks

    locks = RolloutLocks(upgraded["app_url"])
    locks.acquire("churn", "rollout-1", 60)  # INSERT
    locks.release("churn", "rollout-1")  # DELETE
    assert [e.event for e in locks.history("churn")] == ["acquired", "released"]


@pytest.mark.parametrize("statement, refusal", [
    (f"UPDATE {TABLE} SET reason = 'rewritten'", "permission denied"),
    (f"DELETE FROM {TABLE}", "permission denied"),
    (f"TRUNCATE {TABLE}", "permission denied"),
    (f"DROP TRIGGER {TABLE}_no_update_delete ON {TABLE}", "must be owner"),
    (f"DROP TRIGGER {TABLE}_no_truncate ON {TABLE}", "must be owner"),
    (f"ALTER TABLE {TABLE} DISABLE TRIGGER ALL", "must be owner"),
    (f"DROP TABLE {TABLE}", "must be owner"),
    (f"CREATE TABLE {TABLE}_shadow (id int)", "permission denied"),
])  # fmt: skip
def test_the_app_role_cannot_rewrite_the_audit_log(upgraded: dict[str, str], statement: str, refusal: str) -> None:
    AuditLog(upgraded["app_url"]).append("churn", "champion", None, "1", "kept", "user:a")
    before = AuditLog(upgraded["app_url"]).entries()
    with pytest.raises(DBAPIError, match=refusal):
        _as(upgraded["app_url"], statement)
    assert AuditLog(upgraded["app_url"]).entries() == before, "nothing changed"


def test_the_owner_is_refused_by_the_triggers_and_upgrade_is_idempotent(upgraded: dict[str, str]) -> None:
    AuditLog(upgraded["app_url"]).append("churn", "champion", "1", "2", "promoted", "user:b")
    with pytest.raises(DBAPIError, match="append-only"):
        _as(upgraded["owner_url"], f"UPDATE {TABLE} SET reason = 'rewritten'")
    before = AuditLog(upgraded["app_url"]).entries()
    migrations.upgrade_database(upgraded["owner_url"], [upgraded["app"]])
    assert AuditLog(upgraded["app_url"]).entries() == before, "a second upgrade keeps every row"


def test_the_app_role_cannot_run_the_upgrade(upgraded: dict[str, str]) -> None:
    from flywheel.errors import FlywheelError

    with pytest.raises(FlywheelError, match="owner"):
        migrations.upgrade(upgraded["app_url"])


def test_a_database_behind_the_revision_names_the_upgrade(upgraded: dict[str, str], monkeypatch) -> None:
    monkeypatch.setattr(migrations, "REVISION", migrations.REVISION + 1)
    behind = r"revision \d+, this Flywheel needs \d+: run `flywheel db upgrade`"
    with pytest.raises(migrations.SchemaNotReady, match=behind):
        AuditLog(upgraded["app_url"])
