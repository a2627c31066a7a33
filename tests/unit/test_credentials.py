"""The production profile refuses to start with empty or default credentials, naming the variable; the
local profiles check nothing. Each entry point (service, webhook receiver, flows, `flywheel db upgrade`)
is tried with one bad credential at a time."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from flywheel.credentials import CredentialsError, problems, require_credentials
from flywheel.settings import load_settings

ROOT = Path(__file__).resolve().parents[2]
GOOD_URL = "postgresql+psycopg://flywheel_app:Kx8-long-random-pw@db:5432/flywheel"
GOOD = {
    "FLYWHEEL_STORES__AUDIT_DB_URL": GOOD_URL,
    "FLYWHEEL_STORES__OWNER_DB_URL": "postgresql+psycopg://flywheel_owner:Zq9-other-random-pw@db:5432/flywheel",
    "FLYWHEEL_STORES__MLFLOW_TRACKING_URI": "postgresql+psycopg://mlflow:Mm4-random-pw-mlflow@db:5432/mlflow",
    "FLYWHEEL_SERVE__PREDICTION_LOG_URL": GOOD_URL,
    "FLYWHEEL_ADMIN_TOKEN": "a3f9c2e1b7d84f06a3f9c2e1",
    "FLYWHEEL_WEBHOOK_SECRET": "whsec-5d1e0b7c9a2f4e68",
}
ENV_EXAMPLE = ROOT / ".env.example"


def _settings(env: dict[str, str], profile: str = "production"):
    return load_settings(profile=profile, config_dir=ROOT / "configs", environ=env)


def _named(env: dict[str, str], component: str) -> list[str]:
    return [p.variable for p in problems(_settings(env), component, env)]  # type: ignore[arg-type]


def test_good_credentials_pass_every_component() -> None:
    for component in ("service", "webhook", "flows", "migrations"):
        assert _named(GOOD, component) == [], component


@pytest.mark.parametrize("variable, value, component", [
    ("FLYWHEEL_ADMIN_TOKEN", None, "service"),
    ("FLYWHEEL_ADMIN_TOKEN", "", "service"),
    ("FLYWHEEL_ADMIN_TOKEN", "changeme", "service"),
    ("FLYWHEEL_ADMIN_TOKEN", "short-token", "service"),
    ("FLYWHEEL_WEBHOOK_SECRET", None, "webhook"),
    ("FLYWHEEL_WEBHOOK_SECRET", "   ", "webhook"),
    ("FLYWHEEL_WEBHOOK_SECRET_PREVIOUS", "secret", "webhook"),
    ("FLYWHEEL_STORES__AUDIT_DB_URL", "postgresql+psycopg://postgres@db:5432/flywheel", "flows"),
    ("FLYWHEEL_STORES__AUDIT_DB_URL", "postgresql+psycopg://flywheel:flywheel@db:5432/flywheel", "webhook"),
    ("FLYWHEEL_SERVE__PREDICTION_LOG_URL", "postgresql+psycopg://app:postgres@db/flywheel", "service"),
    ("FLYWHEEL_STORES__MLFLOW_TRACKING_URI", "postgresql+psycopg://mlflow:@db/mlflow", "flows"),
    ("FLYWHEEL_STORES__OWNER_DB_URL", "postgresql+psycopg://owner:password@db/flywheel", "migrations"),
    ("PREFECT_API_AUTH_STRING", "admin:admin", "flows"),
    ("PREFECT_API_AUTH_STRING", "admin:", "webhook"),
    ("MLFLOW_TRACKING_PASSWORD", "password1234", "service"),
    ("AWS_SECRET_ACCESS_KEY", "minioadmin", "flows"),
])  # fmt: skip
def test_each_empty_or_default_credential_is_refused_by_name(variable: str, value: str | None, component: str) -> None:
    env = {k: v for k, v in GOOD.items() if k != variable}
    if value is not None:
        env[variable] = value
    assert _named(env, component) == [variable]
    with pytest.raises(CredentialsError, match=variable) as err:
        require_credentials(_settings(env), component, env)  # type: ignore[arg-type]
    if value and len(value.strip()) > 3:
        assert value not in str(err.value).replace(variable, ""), "the value itself is never echoed"


def test_an_unset_optional_secret_is_not_in_use() -> None:
    env = {**GOOD, "FLYWHEEL_WEBHOOK_SECRET_PREVIOUS": "", "PREFECT_API_AUTH_STRING": ""}
    assert _named(env, "webhook") == []


def test_every_problem_is_reported_at_once() -> None:
    env = {"FLYWHEEL_STORES__AUDIT_DB_URL": "postgresql+psycopg://postgres@db/flywheel"}
    named = _named(env, "service")
    assert {"FLYWHEEL_ADMIN_TOKEN", "FLYWHEEL_STORES__AUDIT_DB_URL"} <= set(named)


def test_local_profiles_check_nothing() -> None:
    for profile in ("local", "ci"):
        require_credentials(_settings({}, profile), "service", {})  # no admin token, SQLite: fine


def test_a_notify_target_secret_is_a_credential_of_the_flows() -> None:
    env = {**GOOD, "FLYWHEEL_NOTIFY__TARGETS": "[{url: 'https://alerts.example.com/h', secret_env: ALERTS_SECRET}]"}
    assert _named(env, "flows") == ["ALERTS_SECRET"]
    assert _named({**env, "ALERTS_SECRET": "alerts-secret-1234567"}, "flows") == []


def test_the_service_refuses_to_start(monkeypatch: pytest.MonkeyPatch) -> None:
    from flywheel import service

    for k, v in GOOD.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("FLYWHEEL_ADMIN_TOKEN", "admin")
    with pytest.raises(CredentialsError, match="FLYWHEEL_ADMIN_TOKEN is a well-known default"):
        service.run(profile="production", config_dir=ROOT / "configs")


def test_the_webhook_receiver_refuses_to_start(monkeypatch: pytest.MonkeyPatch) -> None:
    from flywheel import webhook

    for k, v in GOOD.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("FLYWHEEL_WEBHOOK_SECRET")
    with pytest.raises(SystemExit, match="FLYWHEEL_WEBHOOK_SECRET is not set"):
        webhook.main(["--profile", "production", "--config-dir", str(ROOT / "configs")])


def test_flows_refuse_to_start(monkeypatch: pytest.MonkeyPatch) -> None:
    from flywheel.runtime import start_run_context

    for k, v in {**GOOD, "FLYWHEEL_STORES__AUDIT_DB_URL": "postgresql+psycopg://postgres@db/x"}.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(CredentialsError, match="FLYWHEEL_STORES__AUDIT_DB_URL the database URL has no password"):
        start_run_context("production", ROOT / "configs")


def test_db_upgrade_refuses_a_default_owner_password() -> None:
    env = {**GOOD, "FLYWHEEL_STORES__OWNER_DB_URL": "postgresql+psycopg://postgres:postgres@127.0.0.1:1/x",
           "PATH": "/usr/bin:/bin"}
    done = subprocess.run([str(Path(sys.executable).parent / "flywheel"), "db", "upgrade", "--profile", "production"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "FLYWHEEL_STORES__OWNER_DB_URL" in done.stderr and "default password" in done.stderr


def test_env_example_lists_every_credential_without_values() -> None:
    lines = [ln.strip() for ln in ENV_EXAMPLE.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    names = {ln.split("=", 1)[0] for ln in lines}
    assert all(ln.endswith("=") for ln in lines), "no values in the repository"
    expected = {*GOOD, "FLYWHEEL_WEBHOOK_SECRET_PREVIOUS", "PREFECT_API_AUTH_STRING", "MLFLOW_TRACKING_PASSWORD",
                "AWS_SECRET_ACCESS_KEY", "FLYWHEEL_PROFILE"}
    assert expected <= names, f"missing from .env.example: {sorted(expected - names)}"
