"""`flywheel deploy` without a server: where it deploys, what it reads from prefect.yaml, what it refuses."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from flywheel.deploy import (
    DEPLOYMENTS_FILE,
    HEARTBEAT_VAR,
    DeployError,
    _pool_template,
    prefect_deploy_command,
    read_work_pools,
    resolve_api_url,
)
from flywheel.errors import ConfigError
from flywheel.settings import load_settings


def test_the_deployments_file_names_one_process_pool() -> None:
    assert read_work_pools(DEPLOYMENTS_FILE) == ["flywheel-process"]


def test_a_deployment_without_a_pool_is_refused_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "prefect.yaml"
    path.write_text("deployments:\n  - name: a\n    entrypoint: f.py:a\n    work_pool: {name: p}\n"
                    "  - name: orphan\n    entrypoint: f.py:b\n")
    with pytest.raises(DeployError, match=r"'orphan' names no work_pool\.name"):
        read_work_pools(path)
    path.write_text("name: x\n")
    with pytest.raises(DeployError, match="no `deployments` list"):
        read_work_pools(path)


def test_the_server_is_the_environment_then_the_settings_and_never_an_ephemeral_one(home: Path) -> None:
    settings = load_settings(profile="ci", config_dir=home / "configs", environ={})
    assert resolve_api_url(settings, {"PREFECT_API_URL": "http://h:4200/api/"}) == "http://h:4200/api"
    prod = load_settings(profile="production", config_dir=home / "configs", environ={})
    assert resolve_api_url(prod, {}) == "http://127.0.0.1:4200/api"
    with pytest.raises(DeployError, match="no Prefect server to deploy to: set PREFECT_API_URL"):
        resolve_api_url(settings, {})  # no stack runs in this home


def test_the_cli_refuses_without_a_server(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from flywheel.cli import app

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    res = CliRunner().invoke(app, ["deploy", "--profile", "ci", "--config-dir", str(home / "configs")])
    assert res.exit_code == 2 and "no Prefect server to deploy to" in res.output, res.output


def test_the_pool_template_gets_the_heartbeat_and_keeps_other_variables() -> None:
    from prefect.workers.process import ProcessWorker

    template = ProcessWorker.get_default_base_job_template()
    template["variables"]["properties"]["env"]["default"] = {"OTHER": "1"}
    out = _pool_template(template, 45)
    assert out["variables"]["properties"]["env"]["default"] == {"OTHER": "1", HEARTBEAT_VAR: "45"}
    assert out["job_configuration"]["env"] == "{{ env }}"


def test_prefect_deploy_is_run_non_interactively_on_every_deployment() -> None:
    cmd = prefect_deploy_command(DEPLOYMENTS_FILE)
    assert cmd[1:] == ["-m", "prefect", "--no-prompt", "deploy", "--all", "--prefect-file", str(DEPLOYMENTS_FILE)]


def test_crash_detection_must_wait_longer_than_a_heartbeat(home: Path) -> None:
    with pytest.raises(ConfigError, match=r"must exceed deploy\.heartbeat_seconds"):
        load_settings(profile="ci", config_dir=home / "configs",
                      environ={"FLYWHEEL_DEPLOY__HEARTBEAT_SECONDS": "120",
                               "FLYWHEEL_DEPLOY__CRASHED_AFTER_SECONDS": "90"})
    with pytest.raises(ConfigError, match="heartbeat_seconds"):
        load_settings(profile="ci", config_dir=home / "configs", environ={"FLYWHEEL_DEPLOY__HEARTBEAT_SECONDS": "5"})


def test_flywheel_home_is_the_workers_code_checkout_not_a_settings_key(home: Path) -> None:
    # the pull step of deployments/prefect.yaml starts each run in $FLYWHEEL_HOME; it once failed every run
    # as an unknown settings key `home`
    settings = load_settings(profile="ci", config_dir=home / "configs", environ={"FLYWHEEL_HOME": "/app"})
    assert settings.paths.home == home
