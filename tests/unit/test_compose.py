"""docker-compose.yml parses and describes the production profile's stores."""

from __future__ import annotations

import yaml

from flywheel.settings import load_settings
from tests.conftest import PROJECT


def test_compose_services_match_production_profile() -> None:
    compose = yaml.safe_load((PROJECT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"postgres", "redis", "prefect-server", "mlflow", "worker"} <= set(services)
    prod = load_settings(profile="production", config_dir=PROJECT / "configs", environ={})
    assert prod.stores.feast_online.type == "redis"
    assert prod.stores.feast_online.connection_string.endswith(":6379")
    assert "6379:6379" in services["redis"]["ports"]
    assert "5432:5432" in services["postgres"]["ports"]
    assert prod.audit_db_url.startswith("postgresql")
    assert prod.mlflow_tracking_uri.startswith("postgresql")
    assert prod.stores.prefect_api_url.endswith(":4200/api")
    assert "4200:4200" in services["prefect-server"]["ports"]
    env = services["worker"]["environment"]
    assert env["FLYWHEEL_PROFILE"] == "production"
    init = (PROJECT / "deployments" / "postgres-init.sql").read_text()
    for db in ("prefect", "flywheel", "flywheel_mlflow"):
        assert f"CREATE DATABASE {db};" in init


def test_prefect_yaml_entrypoints_exist() -> None:
    spec = yaml.safe_load((PROJECT / "deployments" / "prefect.yaml").read_text())
    for dep in spec["deployments"]:
        path, _, func = dep["entrypoint"].partition(":")
        assert (PROJECT / path).is_file(), path
        assert f"def {func}(" in (PROJECT / path).read_text()
