"""Runs without a stack on a busy machine: Prefect's ephemeral-server start-up timeout comes from the
settings, and when it still expires the CLI says what to do and exits 2 without a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import pytest
import typer

from flywheel.cli import EPHEMERAL_TIMEOUT_MESSAGE, ephemeral_timeout_advice, prefect_start_advice
from flywheel.settings import EPHEMERAL_STARTUP_TIMEOUT_VAR, apply_runtime_environment, load_settings

FLYWHEEL = str(Path(sys.executable).with_name("flywheel"))


@pytest.fixture
def no_timeout_var(monkeypatch: pytest.MonkeyPatch) -> None:
    """The variable unset for the test and restored afterwards (set first so monkeypatch records it)."""
    monkeypatch.setenv(EPHEMERAL_STARTUP_TIMEOUT_VAR, "placeholder")
    monkeypatch.delenv(EPHEMERAL_STARTUP_TIMEOUT_VAR)


def _start_ephemeral_server_too_slowly() -> None:
    """Raise exactly what Prefect's SubprocessASGIServer.start raises when its server does not answer."""
    raise RuntimeError(f"{EPHEMERAL_TIMEOUT_MESSAGE}. Ephemeral server process exited with code -9.")


def test_the_default_is_generous_for_a_busy_two_core_machine(home: Path) -> None:
    settings = load_settings("ci", home / "configs", environ={})
    assert settings.stack.ephemeral_startup_timeout_seconds >= 180  # Prefect's own default, 20, expired at 56 s


def test_the_setting_reaches_prefect(home: Path, no_timeout_var: None) -> None:
    settings = load_settings("ci", home / "configs",
                             environ={"FLYWHEEL_STACK__EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "321"})
    apply_runtime_environment(settings)
    assert os.environ[EPHEMERAL_STARTUP_TIMEOUT_VAR] == "321"
    from prefect.settings import Settings as PrefectSettings

    # a fresh Prefect settings object reads the environment as Prefect does at import: the name is right
    assert PrefectSettings().server.ephemeral.startup_timeout_seconds == 321


def test_an_explicit_prefect_variable_wins(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(EPHEMERAL_STARTUP_TIMEOUT_VAR, "77")
    apply_runtime_environment(load_settings("ci", home / "configs", environ={}))
    assert os.environ[EPHEMERAL_STARTUP_TIMEOUT_VAR] == "77"


def test_the_timeout_must_be_positive(home: Path) -> None:
    from flywheel.errors import ConfigError

    with pytest.raises(ConfigError, match=r"stack\.ephemeral_startup_timeout_seconds"):
        load_settings("ci", home / "configs", environ={"FLYWHEEL_STACK__EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "0"})


def test_the_message_matched_is_the_one_the_installed_prefect_raises() -> None:
    spec = find_spec("prefect")
    assert spec is not None and spec.origin is not None
    source = (Path(spec.origin).parent / "server" / "api" / "server.py").read_text()
    assert EPHEMERAL_TIMEOUT_MESSAGE in source


def test_the_timeout_becomes_advice_and_exit_2(capsys: pytest.CaptureFixture[str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(EPHEMERAL_STARTUP_TIMEOUT_VAR, "180")
    with pytest.raises(typer.Exit) as exited, prefect_start_advice():
        _start_ephemeral_server_too_slowly()
    assert exited.value.exit_code == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"error: Prefect's temporary (ephemeral) API server did not start in time ({EPHEMERAL_STARTUP_TIMEOUT_VAR}" \
           "=180)" in err, err
    for advice in ("`flywheel up`", "stack.ephemeral_startup_timeout_seconds",
                   "FLYWHEEL_STACK__EPHEMERAL_STARTUP_TIMEOUT_SECONDS="):
        assert advice in err, f"{advice!r} missing from: {err}"
    assert "Traceback" not in err


def test_other_runtime_errors_pass_through_unchanged() -> None:
    with pytest.raises(RuntimeError, match=r"^something else$"), prefect_start_advice():
        raise RuntimeError("something else")
    assert ephemeral_timeout_advice(ValueError(EPHEMERAL_TIMEOUT_MESSAGE)) is None


@pytest.mark.integration
@pytest.mark.slow
def test_train_without_a_stack_reports_the_timeout_it_was_given(home: Path, tmp_path: Path) -> None:
    """The real thing: `flywheel train`, no stack, the setting at 1 s (Prefect's server needs 6-13 s to
    start): Prefect raises its RuntimeError in the CLI process, which exits 2 with the advice."""
    (home / "data" / "incoming" / "churn").mkdir(parents=True)  # the source exists; nothing is read before
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "FLYWHEEL_"))}
    env.update({"FLYWHEEL_STACK__EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "1",
                "PREFECT_HOME": str(tmp_path / "prefect-home")})  # the ephemeral database stays in the test
    done = subprocess.run([FLYWHEEL, "train", "--profile", "ci", "--config-dir", str(home / "configs")], env=env,
                          cwd=home, capture_output=True, text=True, timeout=300)
    out = " ".join((done.stdout + done.stderr).split())
    assert done.returncode == 2, out
    assert f"({EPHEMERAL_STARTUP_TIMEOUT_VAR}=1)" in out and "`flywheel up`" in out, out
    assert "Traceback" not in out, out
