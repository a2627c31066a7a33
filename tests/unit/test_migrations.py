"""The one migration path: declared tables are created where missing, idempotently; SQLite stores create
their tables themselves, PostgreSQL ones only check the revision `flywheel db upgrade` recorded."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import sqlalchemy as sa

from flywheel import migrations
from flywheel.errors import FlywheelError


def test_upgrade_creates_declared_tables_once_and_is_idempotent(tmp_path: Path, monkeypatch) -> None:
    metadata = sa.MetaData()
    monkeypatch.setattr(migrations, "METADATA", metadata)
    monkeypatch.setattr(migrations, "TABLE_MODULES", [])  # the project's modules declare on the real METADATA
    sa.Table("flywheel_example", metadata, sa.Column("id", sa.Integer, primary_key=True))
    url = f"sqlite:///{tmp_path}/loop.db"
    assert migrations.upgrade(url) == ["flywheel_example"]
    assert migrations.upgrade(url) == ["flywheel_example"], "a second run changes nothing and does not fail"
    engine = sa.create_engine(url)
    assert sorted(sa.inspect(engine).get_table_names()) == ["flywheel_example", migrations.VERSION_TABLE]
    assert migrations.database_revision(engine) == migrations.REVISION, "the revision is recorded once"
    with engine.connect() as conn:
        assert conn.execute(sa.text(f"SELECT count(*) FROM {migrations.VERSION_TABLE}")).scalar() == 1
    engine.dispose()


def test_upgrade_adds_the_columns_and_indexes_a_table_gained(tmp_path: Path, monkeypatch) -> None:
    url = f"sqlite:///{tmp_path}/old.db"
    old = sa.MetaData()  # the table as an earlier revision declared it
    sa.Table("flywheel_example", old, sa.Column("id", sa.Integer, primary_key=True))
    engine = sa.create_engine(url)
    old.create_all(engine)
    metadata = sa.MetaData()
    monkeypatch.setattr(migrations, "METADATA", metadata)
    monkeypatch.setattr(migrations, "TABLE_MODULES", [])
    sa.Table("flywheel_example", metadata, sa.Column("id", sa.Integer, primary_key=True),
             sa.Column("state", sa.String(16)), sa.Index("ix_flywheel_example_state", "state"))
    migrations.upgrade(url)
    migrations.upgrade(url)  # idempotent
    inspector = sa.inspect(engine)
    assert [c["name"] for c in inspector.get_columns("flywheel_example")] == ["id", "state"]
    assert [ix["name"] for ix in inspector.get_indexes("flywheel_example")] == ["ix_flywheel_example_state"]
    engine.dispose()


def test_schema_digest_matches_the_revision() -> None:
    digest = migrations.schema_digest()
    assert digest == migrations.SCHEMA_DIGEST, (
        f"the declared tables changed: bump migrations.REVISION (now {migrations.REVISION}) and set "
        f'SCHEMA_DIGEST = "{digest}", so running services ask for `flywheel db upgrade`')


def test_upgrade_makes_every_table_and_the_audit_triggers_on_sqlite(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/flywheel.db"
    tables = migrations.upgrade(url)
    engine = sa.create_engine(url)
    assert set(tables) <= set(sa.inspect(engine).get_table_names())
    assert {"flywheel_alias_audit", "flywheel_rollout_locks", "flywheel_predictions"} <= set(tables)
    with engine.connect() as conn:
        triggers = {r[0] for r in conn.execute(sa.text("SELECT name FROM sqlite_master WHERE type = 'trigger'"))}
    assert {"flywheel_alias_audit_no_update", "flywheel_alias_audit_no_delete"} <= triggers
    engine.dispose()


def test_sqlite_stores_still_create_their_tables(tmp_path: Path) -> None:
    from flywheel.audit import AuditLog
    from flywheel.locks import RolloutLocks

    url = f"sqlite:///{tmp_path}/fresh.db"
    RolloutLocks(url).acquire("churn", "me", 60)
    AuditLog(url).append("churn", "champion", None, "1", "first", "user:a")
    assert len(AuditLog(url).entries()) == 1


def test_grants_do_not_apply_to_sqlite(tmp_path: Path) -> None:
    with pytest.raises(FlywheelError, match="only on PostgreSQL"):
        migrations.upgrade(f"sqlite:///{tmp_path}/x.db", grant_to=["app"])


def test_application_roles_are_the_other_users_of_the_same_database() -> None:
    owner = "postgresql+psycopg://owner:pw@db:5432/flywheel"
    urls = ["postgresql+psycopg://app:pw@db/flywheel", "postgresql+psycopg://app:pw@db:5432/flywheel",
            "postgresql+psycopg://owner:pw@db:5432/flywheel", "postgresql+psycopg://other:pw@db:5432/elsewhere",
            "sqlite:////tmp/x.db", "postgresql+psycopg://writer:pw@db:5432/flywheel"]
    assert migrations.application_roles(owner, urls) == ["app", "writer"]
    assert migrations.application_roles("sqlite:////tmp/x.db", urls) == []


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again on exit: nothing listens there


def test_unreachable_postgres_at_start_is_one_clear_error() -> None:
    from flywheel.audit import AuditLog

    url = f"postgresql+psycopg://app:s3cret@127.0.0.1:{_closed_port()}/flywheel?connect_timeout=3"
    with pytest.raises(FlywheelError, match=r"project database .*127\.0\.0\.1.* is unreachable") as err:
        AuditLog(url)
    assert "s3cret" not in str(err.value), "the password is not echoed"
