"""Fail closed at start-up: a missing config file and an unreachable database each give one clear error line
naming what is wrong (exit 2, no traceback) and leave nothing behind. (A corrupt parquet batch:
tests/unit/test_validation.py for the task, tests/integration/test_training_flow.py for the flow.)"""

from __future__ import annotations

import socket
from pathlib import Path

from typer.testing import CliRunner

from flywheel.cli import app
from tests.conftest import make_home

runner = CliRunner()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again on exit: nothing listens there


def _one_error(result) -> str:
    out = result.output
    assert result.exit_code == 2, out
    assert "Traceback" not in out, out
    lines = [ln for ln in out.splitlines() if ln.strip()]
    assert lines[0].startswith("error:"), out
    return " ".join(lines)


def _files(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*")}


def test_missing_profile_file_is_named_and_nothing_is_created(tmp_path: Path) -> None:
    home = make_home(tmp_path / "home")
    (home / "configs" / "production.yaml").unlink()
    before = _files(home)
    result = runner.invoke(app, ["loop", "status", "--profile", "production", "--config-dir", str(home / "configs")])
    message = _one_error(result)
    assert "production.yaml" in message and "file not found" in message, message
    assert _files(home) == before, "no folder, database or file was created"


def test_missing_config_folder_is_named(tmp_path: Path) -> None:
    result = runner.invoke(app, ["db", "upgrade", "--config-dir", str(tmp_path / "nowhere")])
    message = _one_error(result)
    assert "nowhere" in message and "base.yaml" in message and "file not found" in message, message
    assert not (tmp_path / "nowhere").exists()


def test_missing_dataset_file_is_named(tmp_path: Path) -> None:
    home = make_home(tmp_path / "home")
    (home / "configs" / "datasets" / "churn.yaml").unlink()
    message = _one_error(runner.invoke(app, ["config", "show", "--config-dir", str(home / "configs")]))
    assert "dataset" in message and "churn.yaml" in message and "file not found" in message, message


def test_unreachable_database_at_start_is_one_line_without_the_password(tmp_path: Path, monkeypatch) -> None:
    home = make_home(tmp_path / "home")
    url = f"postgresql+psycopg://app:s3cret-pw-0123456789@127.0.0.1:{_closed_port()}/flywheel?connect_timeout=3"
    monkeypatch.setenv("FLYWHEEL_STORES__AUDIT_DB_URL", url)
    result = runner.invoke(app, ["loop", "status", "--profile", "ci", "--config-dir", str(home / "configs")])
    message = _one_error(result)
    assert "project database" in message and "unreachable" in message and "127.0.0.1" in message, message
    assert "s3cret" not in message


def test_unreachable_database_for_the_upgrade_is_one_line(tmp_path: Path) -> None:
    url = f"postgresql+psycopg://owner:s3cret-pw-0123456789@127.0.0.1:{_closed_port()}/flywheel?connect_timeout=3"
    result = runner.invoke(app, ["db", "upgrade", "--url", url, "--config-dir",
                                 str(make_home(tmp_path / "home") / "configs")])
    message = _one_error(result)
    assert "flywheel db upgrade" in message and "unreachable" in message and "s3cret" not in message, message
