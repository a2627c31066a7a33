"""The production profile refuses to start with empty or default credentials, naming the variable; the
local profiles check nothing. Each entry point (service, webhook receiver, flows, `flywheel db upgrade`) and
each server Flywheel does not write (the Prefect and MLflow servers, the images of PostgreSQL, MinIO and
Grafana, through `flywheel credentials check`) is tried with one bad credential at a time."""

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
    expected = {*GOOD, *SERVERS_GOOD, "FLYWHEEL_WEBHOOK_SECRET_PREVIOUS", "PREFECT_API_AUTH_STRING",
                "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_USERNAME", "FLYWHEEL_PROFILE"}
    assert expected <= names, f"missing from .env.example: {sorted(expected - names)}"


# ------------------------------------------------------------------ the servers Flywheel does not write
SERVERS_GOOD = {
    "PREFECT_SERVER_API_AUTH_STRING": "flywheel:Pf7-long-random-pw",
    "PREFECT_API_DATABASE_CONNECTION_URL": "postgresql+asyncpg://prefect:Pg3-random-pw-prefect@db:5432/prefect",
    "MLFLOW_AUTH_ADMIN_PASSWORD": "Ml5-long-random-admin-pw",
    "MLFLOW_FLASK_SERVER_SECRET_KEY": "c1f0e9d8c7b6a5f4e3d2",
    "MLFLOW_BACKEND_STORE_URI": "postgresql+psycopg://mlflow:Mm4-random-pw-mlflow@db:5432/mlflow",
    "MLFLOW_S3_ENDPOINT_URL": "http://objectstore:9000",
    "AWS_ACCESS_KEY_ID": "flywheel-mlflow",
    "AWS_SECRET_ACCESS_KEY": "S3k-long-random-secret-key",
    "POSTGRES_PASSWORD": "Pg1-long-random-superuser",
    "POSTGRES_OWNER_PASSWORD": "Ow2-long-random-owner-pw",
    "POSTGRES_APP_PASSWORD": "Ap3-long-random-app-pw-x",
    "S3_ACCESS_KEY": "flywheel-mlflow",
    "S3_SECRET_KEY": "S3k-long-random-secret-key",
    "GRAFANA_ADMIN_PASSWORD": "Gr4-long-random-grafana",
}


def test_good_credentials_pass_every_server() -> None:
    for component in ("prefect-server", "mlflow-server", "images"):
        assert _named(SERVERS_GOOD, component) == [], component


@pytest.mark.parametrize("variable, value, component", [
    ("PREFECT_SERVER_API_AUTH_STRING", None, "prefect-server"),
    ("PREFECT_SERVER_API_AUTH_STRING", "", "prefect-server"),
    ("PREFECT_SERVER_API_AUTH_STRING", "admin:admin", "prefect-server"),
    ("PREFECT_SERVER_API_AUTH_STRING", "flywheel:", "prefect-server"),
    ("PREFECT_SERVER_API_AUTH_STRING", "no-colon-in-this-long-string", "prefect-server"),
    ("PREFECT_API_DATABASE_CONNECTION_URL", "postgresql+asyncpg://postgres:postgres@db/prefect", "prefect-server"),
    ("MLFLOW_AUTH_ADMIN_PASSWORD", None, "mlflow-server"),
    ("MLFLOW_AUTH_ADMIN_PASSWORD", "password1234", "mlflow-server"),
    ("MLFLOW_AUTH_ADMIN_PASSWORD", "short-pw", "mlflow-server"),
    ("MLFLOW_FLASK_SERVER_SECRET_KEY", "", "mlflow-server"),
    ("MLFLOW_BACKEND_STORE_URI", "postgresql+psycopg://mlflow@db:5432/mlflow", "mlflow-server"),
    ("AWS_ACCESS_KEY_ID", "minioadmin", "mlflow-server"),
    ("AWS_SECRET_ACCESS_KEY", None, "mlflow-server"),
    ("AWS_SECRET_ACCESS_KEY", "minioadmin", "mlflow-server"),
    ("POSTGRES_PASSWORD", "postgres", "images"),
    ("POSTGRES_OWNER_PASSWORD", None, "images"),
    ("POSTGRES_APP_PASSWORD", "changeme", "images"),
    ("S3_ACCESS_KEY", "minioadmin", "images"),
    ("S3_SECRET_KEY", "minioadmin", "images"),
    ("GRAFANA_ADMIN_PASSWORD", "admin", "images"),
])  # fmt: skip
def test_each_server_refuses_an_empty_or_default_credential_by_name(variable: str, value: str | None,
                                                                    component: str) -> None:
    env = {k: v for k, v in SERVERS_GOOD.items() if k != variable}
    if value is not None:
        env[variable] = value
    assert _named(env, component) == [variable]
    with pytest.raises(CredentialsError, match=variable) as err:
        require_credentials(_settings(env), component, env)  # type: ignore[arg-type]
    if value and len(value.strip()) > 3:
        assert value not in str(err.value).replace(variable, ""), "the value itself is never echoed"


def test_mlflow_server_without_an_object_store_needs_no_keys() -> None:
    env = {k: v for k, v in SERVERS_GOOD.items() if not k.startswith(("AWS_", "MLFLOW_S3_"))}
    assert _named(env, "mlflow-server") == []


def test_clients_of_an_mlflow_server_need_its_password() -> None:
    env = {**GOOD, "FLYWHEEL_STORES__MLFLOW_TRACKING_URI": "http://mlflow:5000"}
    for component in ("flows", "service"):
        assert _named(env, component) == ["MLFLOW_TRACKING_PASSWORD"], component
        assert _named({**env, "MLFLOW_TRACKING_PASSWORD": "Ml5-long-random-admin-pw"}, component) == []
    assert _named(env, "webhook") == [], "the receiver does not talk to MLflow"


def _check(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(Path(sys.executable).parent / "flywheel"), "credentials", "check", *args],
                          cwd=ROOT, env={"PATH": "/usr/bin:/bin", **env}, capture_output=True, text=True, timeout=120)


def test_the_check_refuses_the_server_or_becomes_it() -> None:
    env = {**SERVERS_GOOD, "FLYWHEEL_PROFILE": "production", "PREFECT_SERVER_API_AUTH_STRING": "admin:admin"}
    refused = _check(["prefect-server", "--", "echo", "started"], env)
    assert refused.returncode == 2 and "started" not in refused.stdout
    assert "PREFECT_SERVER_API_AUTH_STRING has a default password" in refused.stderr
    started = _check(["prefect-server", "--", "echo", "started", "--port", "1"], SERVERS_GOOD | {
        "FLYWHEEL_PROFILE": "production"})
    assert started.returncode == 0 and started.stdout.strip() == "started --port 1", started.stderr
    local = _check(["prefect-server", "--", "echo", "started"], {"FLYWHEEL_PROFILE": "local"})
    assert local.returncode == 0 and local.stdout.strip() == "started", "outside production nothing is checked"
    unknown = _check(["nonesuch"], {})
    assert unknown.returncode == 2 and "unknown component 'nonesuch'" in unknown.stderr
