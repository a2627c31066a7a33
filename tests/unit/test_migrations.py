"""The one migration path: declared tables are created where missing, idempotently."""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa

from flywheel import migrations


def test_upgrade_creates_declared_tables_once_and_is_idempotent(tmp_path: Path, monkeypatch) -> None:
    metadata = sa.MetaData()
    monkeypatch.setattr(migrations, "METADATA", metadata)
    monkeypatch.setattr(migrations, "TABLE_MODULES", [])  # the real modules declare on the real METADATA
    sa.Table("flywheel_example", metadata, sa.Column("id", sa.Integer, primary_key=True))
    url = f"sqlite:///{tmp_path}/loop.db"
    assert migrations.upgrade(url) == ["flywheel_example"]
    assert migrations.upgrade(url) == ["flywheel_example"], "a second run changes nothing and does not fail"
    engine = sa.create_engine(url)
    assert sa.inspect(engine).get_table_names() == ["flywheel_example"]
    engine.dispose()
