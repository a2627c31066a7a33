"""docker-compose.yml and the Dockerfile, checked statically (no Docker engine on the development machines):
every variable a Flywheel service gets is a setting (or a variable its program reads), every command is a
real entry point with real options, volumes and dependencies are declared and consistent, the worker reaches
the server, MLflow is reached only through its server (basic auth, artifacts in the object store's bucket),
database roles are split (owner for the migration, application role for the rest), secrets only come from the
environment and every server checks them before it starts."""

from __future__ import annotations

import importlib.util
import re
import shlex
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from flywheel.deploy import read_work_pools
from flywheel.settings import NOT_SETTINGS, load_settings
from tests.conftest import PROJECT

BIN = Path(sys.executable).parent
INTERPOLATION = re.compile(r"\$\{(\w+)(:\?[^}]*)?\}")
SECRETS = {"POSTGRES_PASSWORD": "pw", "FLYWHEEL_ADMIN_TOKEN": "token", "FLYWHEEL_WEBHOOK_SECRET": "secret",
           "GRAFANA_ADMIN_PASSWORD": "grafana", "POSTGRES_OWNER_PASSWORD": "ownerpw",
           "POSTGRES_APP_PASSWORD": "apppw",
           "PREFECT_API_AUTH_STRING": "flywheel:prefectpw", "MLFLOW_TRACKING_USERNAME": "mluser",
           "MLFLOW_TRACKING_PASSWORD": "mlpw", "MLFLOW_FLASK_SERVER_SECRET_KEY": "csrf", "S3_ACCESS_KEY": "s3key",
           "S3_SECRET_KEY": "s3secret"}
# variables read by the programs themselves, not Flywheel settings
PROGRAM_VARS = {"PREFECT_API_URL", "PREFECT_API_DATABASE_CONNECTION_URL", "PREFECT_SERVER_ANALYTICS_ENABLED",
                "PREFECT_UI_API_URL", "DO_NOT_TRACK", "MLFLOW_DISABLE_TELEMETRY", "GX_ANALYTICS_ENABLED",
                "FEAST_USAGE", "POSTGRES_PASSWORD", "PREFECT_API_AUTH_STRING", "MLFLOW_TRACKING_USERNAME",
                "MLFLOW_TRACKING_PASSWORD"}


def _compose() -> dict[str, Any]:
    """The file as compose reads it, with the .env values substituted."""
    text = INTERPOLATION.sub(lambda m: SECRETS[m.group(1)], (PROJECT / "docker-compose.yml").read_text())
    return yaml.safe_load(text)


def _ours(services: dict[str, Any]) -> dict[str, Any]:
    """The services that run the project's image."""
    return {name: svc for name, svc in services.items() if svc.get("build") == "."}


def _argv(svc: dict[str, Any]) -> list[str]:
    cmd = svc["command"]
    return cmd if isinstance(cmd, list) else shlex.split(cmd)


def test_secrets_come_only_from_the_environment_and_are_required() -> None:
    text = (PROJECT / "docker-compose.yml").read_text()
    used = {m.group(1) for m in INTERPOLATION.finditer(text)}
    assert used == set(SECRETS), used
    assert all(m.group(2) for m in INTERPOLATION.finditer(text)), "every ${VAR} is ${VAR:?...}: no silent default"
    example = (PROJECT / ".env.example").read_text()
    for var in used:
        assert re.search(rf"^{var}=$", example, re.M), f"{var} is listed, empty, in .env.example"
    assert ".env" in (PROJECT / ".gitignore").read_text().split()
    assert "postgres:postgres@" not in text, "no default credentials in the file"


def test_the_stack_has_every_service_the_loop_needs() -> None:
    services = _compose()["services"]
    assert {"postgres", "redis", "prefect-server", "migrate", "deploy", "worker", "mlflow", "service", "webhook",
            "prometheus", "grafana"} <= set(services)
    assert {"objectstore"} <= set(services)
    assert set(_ours(services)) == {"credentials", "buckets", "prefect-server", "migrate", "deploy", "worker", "mlflow",
                                    "service", "webhook"}
    assert all(svc["image"] == "flywheel:local" for svc in _ours(services).values()), "one image, built once"


@pytest.mark.parametrize("name", ["deploy", "worker", "service", "webhook"])
def test_each_flywheel_service_environment_is_valid_production_settings(name: str) -> None:
    env = {k: str(v) for k, v in _compose()["services"][name]["environment"].items()}
    for var in env:
        assert var.startswith("FLYWHEEL_") or var in PROGRAM_VARS, f"{name}: {var} is read by nothing"
    # every FLYWHEEL_* variable is a settings key (an unknown one fails the load) or one the code reads itself
    settings = load_settings(profile=env["FLYWHEEL_PROFILE"], config_dir=PROJECT / "configs", environ=env)
    assert settings.profile == "production"
    assert env["FLYWHEEL_CONFIG_DIR"] == "/app/configs" and env["FLYWHEEL_HOME"] == "/app"
    assert "FLYWHEEL_CONFIG_DIR" in NOT_SETTINGS and "FLYWHEEL_HOME" in NOT_SETTINGS
    assert settings.stores.prefect_api_url == env["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert settings.mlflow_tracking_uri == "http://mlflow:5000", "MLflow only through its server (basic auth)"
    assert settings.mlflow_artifact_location.startswith("mlflow-artifacts:/"), "artifacts proxied by the server"
    assert (env["MLFLOW_TRACKING_USERNAME"], env["MLFLOW_TRACKING_PASSWORD"]) == ("mluser", "mlpw")
    assert env["PREFECT_API_AUTH_STRING"] == "flywheel:prefectpw", "the Prefect server's own auth string"
    assert settings.audit_db_url == "postgresql+psycopg://flywheel_app:apppw@postgres:5432/flywheel"
    assert settings.store_url(settings.serve.prediction_log_url) == settings.audit_db_url, "the application role"
    assert not any(k.startswith("AWS_") for k in env), "only the MLflow server holds the object store's keys"
    online = settings.stores.feast_online
    assert online.type == "redis" and online.connection_string == "redis:6379"
    assert env[settings.serve.admin_token_env] == "token", "the service and the rollout runs share the admin token"
    assert settings.serve.host == "service", "rollout runs reach the service by its compose name"
    if name == "webhook":
        assert env[settings.webhook.secret_env] == "secret"


def test_commands_are_real_entry_points() -> None:
    from typer.main import get_command

    from flywheel.cli import app

    services = _ours(_compose()["services"])
    flywheel_commands = set(get_command(app).commands)  # type: ignore[attr-defined]
    for name, svc in services.items():
        argv = _argv(svc)
        if argv[:3] == ["flywheel", "credentials", "check"] and "--" in argv:  # the check, then the server
            assert argv[3] in ("prefect-server", "mlflow-server"), f"{name}: checks {argv[3]}"
            argv = argv[argv.index("--") + 1:]
        if argv[0] == "flywheel":
            assert argv[1] in flywheel_commands, f"{name}: flywheel has no command {argv[1]!r}"
        elif argv[:2] == ["python", "-m"]:
            spec = importlib.util.find_spec(argv[2])
            assert spec and "def main(" in Path(spec.origin).read_text(), f"{name}: {argv[2]} is not runnable"
            _check_options(name, argv[3:], ["--host", "--port", "--profile", "--config-dir"])
        else:
            assert argv[0] in ("prefect", "mlflow") and (BIN / argv[0]).is_file(), f"{name}: {argv[0]} not in the lock"
            _check_options(name, argv[2:], _installed_options(argv[0], argv[1]))


def _installed_options(program: str, command: str) -> list[str]:
    """The options the installed CLI declares (introspected: `--help` costs a minute on a busy machine)."""
    if program == "mlflow":
        import mlflow.cli

        return [opt for param in getattr(mlflow.cli, command).params for opt in param.opts]
    # prefect's commands are cyclopts apps: each option is a string literal in its module
    source = Path(importlib.util.find_spec(f"prefect.cli.{command}").origin).read_text()
    return re.findall(r'"(--[a-z][a-z-]*)"', source)


def _check_options(service: str, args: list[str], known: list[str]) -> None:
    for arg in args:
        if arg.startswith("--"):
            option = arg.split("=")[0]
            assert option in known, f"{service}: unknown option {option}"


def test_ports_health_checks_and_dependencies_agree() -> None:
    services = _compose()["services"]
    for name, svc in services.items():
        for dep, cond in (svc.get("depends_on") or {}).items():
            assert dep in services, f"{name} depends on unknown {dep}"
            if cond["condition"] == "service_healthy":
                assert "healthcheck" in services[dep], f"{name} waits for {dep} to be healthy; it has no check"
            elif cond["condition"] == "service_completed_successfully":
                assert services[dep].get("restart") == "no", f"{dep} must be a one-shot job"
        if svc.get("restart") == "no":  # one-shot jobs (migrate, deploy) end; nothing to check on
            continue
        assert "healthcheck" in svc, f"{name} has no health check"
        argv = _argv(svc) if "command" in svc else []
        if "--port" in argv and svc.get("build") == ".":
            port = argv[argv.index("--port") + 1]
            assert f"127.0.0.1:{port}/" in " ".join(svc["healthcheck"]["test"]), f"{name}: check on another port"
            assert any(p.endswith(f":{port}") for p in svc.get("ports", [])), f"{name}: {port} not published"
    assert services["deploy"]["depends_on"] == {"prefect-server": {"condition": "service_healthy"}}
    assert services["worker"]["depends_on"]["deploy"] == {"condition": "service_completed_successfully"}
    for name in ("worker", "service", "webhook"):  # on PostgreSQL the application creates no table itself
        assert services[name]["depends_on"]["migrate"] == {"condition": "service_completed_successfully"}, name
    assert services["migrate"]["command"] == "flywheel db upgrade"
    assert "FLYWHEEL_STORES__OWNER_DB_URL" in services["migrate"]["environment"]
    prom = yaml.safe_load((PROJECT / "deployments/prometheus/prometheus.yml").read_text())
    targets = {t for job in prom["scrape_configs"] for c in job["static_configs"] for t in c["targets"]}
    for name in ("service", "webhook"):  # Prometheus scrapes each on the port its command serves
        port = _argv(services[name])[_argv(services[name]).index("--port") + 1]
        assert f"{name}:{port}" in targets, (name, targets)
    assert services["webhook"]["depends_on"]["prefect-server"] == {"condition": "service_healthy"}


def test_the_worker_runs_the_pool_that_deploy_creates() -> None:
    argv = _argv(_compose()["services"]["worker"])
    pool = argv[argv.index("--pool") + 1]
    assert [pool] == read_work_pools(PROJECT / "deployments" / "prefect.yaml")
    assert "--with-healthcheck" in argv


def test_volumes_are_declared_and_artifacts_shared_where_the_worker_writes() -> None:
    compose = _compose()
    services, declared = compose["services"], set(compose["volumes"])
    mounts: dict[str, dict[str, str]] = {}
    for name, svc in services.items():
        for vol in svc.get("volumes", []):
            source, target = vol.split(":")[:2]
            if source.startswith("./"):
                assert (PROJECT / source).exists(), f"{name}: bind mount {source} does not exist"
            else:
                assert source in declared, f"{name}: volume {source} is not declared"
                mounts.setdefault(source, {})[name] = target
    assert set(mounts) == declared, f"declared but unused: {declared - set(mounts)}"

    assert mounts["flywheel-data"] == {"worker": "/app/data", "service": "/app/data"}, "the Feast registry, shared"
    assert mounts["mlflow-auth"] == {"mlflow": services["mlflow"]["working_dir"]}, "MLflow's users persist"
    assert "FLYWHEEL_ADMIN_TOKEN" not in services["mlflow"]["environment"], "secrets only where they are used"


def test_mlflow_server_has_basic_auth_and_artifacts_in_the_bucket() -> None:
    services = _compose()["services"]
    mlflow, argv = services["mlflow"], _argv(services["mlflow"])
    server = argv[argv.index("--") + 1:]
    assert server[:2] == ["mlflow", "server"] and server[server.index("--app-name") + 1] == "basic-auth"
    bucket = server[server.index("--artifacts-destination") + 1]
    assert bucket == "s3://flywheel-mlflow/artifacts" and "--no-serve-artifacts" not in server, "proxied artifacts"
    assert _argv(services["buckets"])[-1] == "flywheel-mlflow", "the bucket the server writes to is made first"
    assert mlflow["depends_on"]["buckets"] == {"condition": "service_completed_successfully"}
    env = mlflow["environment"]
    assert env["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql+psycopg://"), "tracking and registry on PostgreSQL"
    assert (env["MLFLOW_AUTH_ADMIN_USERNAME"], env["MLFLOW_AUTH_ADMIN_PASSWORD"]) == ("mluser", "mlpw"), \
        "the admin the clients log in as"
    assert env["MLFLOW_S3_ENDPOINT_URL"] == services["buckets"]["environment"]["MLFLOW_S3_ENDPOINT_URL"] \
        == "http://objectstore:9000"
    assert (env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]) == ("s3key", "s3secret")
    store = services["objectstore"]["environment"]
    assert (store["MINIO_ROOT_USER"], store["MINIO_ROOT_PASSWORD"]) == ("s3key", "s3secret")
    ini = env["MLFLOW_AUTH_CONFIG_PATH"]
    assert ini.startswith("/app/") and (PROJECT / ini.removeprefix("/app/")).is_file()
    import configparser

    auth = configparser.ConfigParser()
    auth.read(PROJECT / ini.removeprefix("/app/"))
    assert "admin_password" not in auth["mlflow"], "no secret in the repository"
    assert auth["mlflow"]["default_permission"] == "NO_PERMISSIONS"
    assert auth["mlflow"]["database_uri"].startswith("sqlite:///") and not auth["mlflow"]["database_uri"].startswith(
        "sqlite:////"), "relative: on the mlflow-auth volume, the server's working directory"


def test_prefect_server_has_api_auth_and_clients_send_it() -> None:
    services = _compose()["services"]
    env = services["prefect-server"]["environment"]
    assert env["PREFECT_SERVER_API_AUTH_STRING"] == "flywheel:prefectpw"
    for name in ("deploy", "worker", "service", "webhook"):
        assert services[name]["environment"]["PREFECT_API_AUTH_STRING"] == env["PREFECT_SERVER_API_AUTH_STRING"], name


def test_every_server_checks_its_credentials_before_it_starts() -> None:
    from flywheel.credentials import SERVER_CREDENTIALS

    services = _compose()["services"]
    for name, component in (("prefect-server", "prefect-server"), ("mlflow", "mlflow-server")):
        argv = _argv(services[name])
        assert argv[:4] == ["flywheel", "credentials", "check", component] and argv[4] == "--", name
        assert services[name]["environment"]["FLYWHEEL_PROFILE"] == "production", name
        required = {var for var, _, needed in SERVER_CREDENTIALS[component] if needed}
        assert required <= set(services[name]["environment"]), f"{name}: {required}"
    # the images that cannot run Flywheel wait for the one-shot check of their secrets
    check = services["credentials"]
    assert _argv(check) == ["flywheel", "credentials", "check", "images"] and check["restart"] == "no"
    assert {var for var, _, _ in SERVER_CREDENTIALS["images"]} <= set(check["environment"])
    for name in ("postgres", "objectstore", "grafana"):
        assert services[name]["depends_on"]["credentials"] == {"condition": "service_completed_successfully"}, name


def test_the_migration_runs_as_the_owner_and_everything_else_as_the_application_role() -> None:
    services = _compose()["services"]
    owner = services["migrate"]["environment"]["FLYWHEEL_STORES__OWNER_DB_URL"]
    assert owner == "postgresql+psycopg://flywheel_owner:ownerpw@postgres:5432/flywheel"
    for name in ("deploy", "worker", "service", "webhook"):
        for var, value in services[name]["environment"].items():
            assert "flywheel_owner" not in value and "postgres:pw@" not in value, f"{name}: {var} as the owner"
    script = (PROJECT / "deployments" / "postgres-init.sh").read_text()
    assert "CREATE DATABASE flywheel OWNER flywheel_owner;" in script
    assert "CREATE ROLE flywheel_app LOGIN PASSWORD :'app_password';" in script, "no password in the file"
    env = services["postgres"]["environment"]
    assert {"POSTGRES_OWNER_PASSWORD", "POSTGRES_APP_PASSWORD"} <= set(env)
    assert "./deployments/postgres-init.sh:/docker-entrypoint-initdb.d/init.sh:ro" in services["postgres"]["volumes"]


def test_dockerfile_builds_the_locked_environment_as_a_non_root_user() -> None:
    text = (PROJECT / "Dockerfile").read_text().replace("\\\n", " ")  # join continued lines
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    runs = [ln for ln in lines if ln.startswith("RUN ")]
    assert any(re.search(r"pip install .*uv==\d+\.\d+\.\d+", r) for r in runs), "uv itself pinned"
    syncs = [r for r in runs if "uv sync" in r]
    assert syncs and all("--frozen" in r and "--no-dev" in r for r in syncs), "only what uv.lock pins"
    users = [ln.split()[1] for ln in lines if ln.startswith("USER ")]
    assert users and users[-1] not in ("root", "0"), "the services do not run as root"
    for ln in lines:
        if ln.startswith("COPY ") and "--from" not in ln:
            for src in ln.split()[1:-1]:
                assert (PROJECT / src).exists(), f"COPY {src}: no such file"
    env = " ".join(ln for ln in lines if ln.startswith("ENV "))
    assert "FLYWHEEL_HOME=/app" in env and "PATH=/app/.venv/bin" in env


def test_compose_services_match_production_profile() -> None:
    services = _compose()["services"]
    prod = load_settings(profile="production", config_dir=PROJECT / "configs", environ={})
    assert prod.stores.feast_online.type == "redis"
    assert prod.stores.feast_online.connection_string.endswith(":6379")
    assert "6379:6379" in services["redis"]["ports"]
    assert "5432:5432" in services["postgres"]["ports"]
    assert prod.stores.prefect_api_url.endswith(":4200/api")
    assert "4200:4200" in services["prefect-server"]["ports"]
    init = (PROJECT / "deployments" / "postgres-init.sh").read_text()
    for db in ("prefect", "flywheel", "flywheel_mlflow"):
        assert re.search(rf"CREATE DATABASE {db}( OWNER \w+)?;", init), db


def test_prefect_yaml_entrypoints_exist() -> None:
    spec = yaml.safe_load((PROJECT / "deployments" / "prefect.yaml").read_text())
    for dep in spec["deployments"]:
        path, _, func = dep["entrypoint"].partition(":")
        assert (PROJECT / path).is_file(), path
        assert f"def {func}(" in (PROJECT / path).read_text()
