"""`flywheel deploy`: register the deployments of deployments/prefect.yaml on a Prefect server, for workers.

Three steps, each idempotent (run it again after any change to prefect.yaml):
1. every work pool prefect.yaml names is created as a `process` pool if missing; its job environment gets
   PREFECT_FLOWS_HEARTBEAT_FREQUENCY = `deploy.heartbeat_seconds`, so every worker's runs send heartbeats;
2. the deployments are registered by Prefect's own `prefect deploy --all --prefect-file ...` (schedules,
   event triggers, concurrency limits and the pull step are read from the file by Prefect itself);
3. the automation that marks a Running flow run Crashed when its heartbeats stop for
   `deploy.crashed_after_seconds` (Prefect's recipe for "zombie" runs: a killed worker or machine) is
   created or replaced.

The server is PREFECT_API_URL, else `stores.prefect_api_url`, else a running `flywheel up` stack: never
Prefect's ephemeral server, which dies with this process. No Prefect import at module level.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import yaml

from flywheel.errors import FlywheelError
from flywheel.settings import DeployConfig, Settings

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEPLOYMENTS_FILE = PROJECT_ROOT / "deployments" / "prefect.yaml"
CRASH_AUTOMATION = "flywheel: mark flow runs Crashed when their heartbeats stop"
HEARTBEAT_VAR = "PREFECT_FLOWS_HEARTBEAT_FREQUENCY"
DEPLOY_TIMEOUT_SECONDS = 900.0
Echo = Callable[[str], None]


class DeployError(FlywheelError):
    """`flywheel deploy` could not register the deployments (no server, a bad prefect.yaml, a refused deploy)."""


@dataclass(frozen=True)
class DeployReport:
    api_url: str
    pools_created: list[str]
    pools_updated: list[str]
    deployments: list[str]  # "<flow>/<deployment>" as `prefect deployment run` takes them
    crash_automation_id: str


def resolve_api_url(settings: Settings, environ: dict[str, str] | None = None) -> str:
    """The Prefect server to deploy to; a DeployError when none is configured or running."""
    from flywheel.stack import active_api_url

    env = os.environ if environ is None else environ
    url = env.get("PREFECT_API_URL") or settings.stores.prefect_api_url or active_api_url(settings, env)
    if not url:
        raise DeployError("no Prefect server to deploy to: set PREFECT_API_URL (e.g. http://HOST:4200/api) or "
                          "stores.prefect_api_url, or start the local stack with `flywheel up`")
    return url.rstrip("/")


def read_work_pools(path: Path) -> list[str]:
    """The work pools the deployments of `path` run on; a DeployError naming the deployment that has none."""
    try:
        spec = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise DeployError(f"{path}: cannot read it ({exc})") from None
    deployments = spec.get("deployments")
    if not isinstance(deployments, list) or not deployments:
        raise DeployError(f"{path}: no `deployments` list")
    pools: list[str] = []
    for dep in deployments:
        name = (dep.get("work_pool") or {}).get("name")
        if not name:
            raise DeployError(f"{path}: deployment {dep.get('name')!r} names no work_pool.name")
        if name not in pools:
            pools.append(name)
    return pools


def _pool_template(template: dict[str, Any], heartbeat_seconds: int) -> dict[str, Any]:
    """The pool's base job template with the heartbeat in the default job environment (other keys kept)."""
    env = template["variables"]["properties"]["env"]
    env["default"] = {**(env.get("default") or {}), HEARTBEAT_VAR: str(heartbeat_seconds)}
    return template


def ensure_work_pool(name: str, heartbeat_seconds: int) -> str:
    """Create the process pool `name` if missing ("created"), else set its heartbeat ("updated"/"unchanged")."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client:
        try:
            pool = client.read_work_pool(name)
        except ObjectNotFound:
            template = _pool_template(ProcessWorker.get_default_base_job_template(), heartbeat_seconds)
            client.create_work_pool(WorkPoolCreate(name=name, type="process", base_job_template=template,
                                                   description="Flywheel flows; run them with "
                                                               f"`prefect worker start --pool {name}`"))
            return "created"
        if pool.type != "process":
            raise DeployError(f"work pool {name!r} exists with type {pool.type!r}; Flywheel's deployments need a "
                              "process pool (delete it, or name another pool in deployments/prefect.yaml)")
        wanted = _pool_template(copy.deepcopy(pool.base_job_template), heartbeat_seconds)
        if wanted == pool.base_job_template:
            return "unchanged"
        client.update_work_pool(name, WorkPoolUpdate(base_job_template=wanted))
        return "updated"


def prefect_deploy_command(path: Path) -> list[str]:
    return [sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all", "--prefect-file", str(path)]


def register_deployments(path: Path, api_url: str) -> list[str]:
    """`prefect deploy --all` from the project root (entrypoints are relative to it); the names it registered."""
    env = {**os.environ, "PREFECT_API_URL": api_url}
    try:
        done = subprocess.run(prefect_deploy_command(path), cwd=path.resolve().parents[1], env=env,
                              capture_output=True, text=True, timeout=DEPLOY_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        raise DeployError(f"`prefect deploy` did not finish in {DEPLOY_TIMEOUT_SECONDS:.0f} s") from None
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-25:])
        raise DeployError(f"`prefect deploy --all --prefect-file {path}` failed (exit {done.returncode}):\n{tail}")
    return _registered(path)


def _registered(path: Path) -> list[str]:
    """Every deployment of `path` as the server now has it ("<flow>/<deployment>"); DeployError if one is missing."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    spec = yaml.safe_load(path.read_text())
    names = []
    with get_client(sync_client=True) as client:
        for dep in spec["deployments"]:
            file, _, func = dep["entrypoint"].partition(":")
            flow_name = _flow_name(path.resolve().parents[1] / file, func)
            try:
                client.read_deployment_by_name(f"{flow_name}/{dep['name']}")
            except ObjectNotFound:
                raise DeployError(f"`prefect deploy` succeeded but {flow_name}/{dep['name']} is not on the "
                                  "server") from None
            names.append(f"{flow_name}/{dep['name']}")
    return names


def _flow_name(file: Path, func: str) -> str:
    """The flow's name as Prefect registers it (its `@flow(name=...)`), read without importing the flow."""
    from prefect.flows import load_flow_arguments_from_entrypoint

    args = load_flow_arguments_from_entrypoint(f"{file}:{func}")
    return str(args.get("name") or func.replace("_", "-"))


def ensure_crash_detection(config: DeployConfig) -> str:
    """Create (or replace) the automation that marks a Running flow run Crashed once no heartbeat, nor a final
    state, came for `crashed_after_seconds` after its last heartbeat; its id."""
    from prefect.automations import Automation
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    with get_client(sync_client=True) as client:
        for old in client.read_automations_by_name(CRASH_AUTOMATION):
            client.delete_automation(old.id)
    automation = Automation(
        name=CRASH_AUTOMATION,
        description=f"A flow run that sent a heartbeat (every {config.heartbeat_seconds} s, the pool's "
                    f"{HEARTBEAT_VAR}) and then nothing for {config.crashed_after_seconds} s - no heartbeat, no "
                    "final state - lost its process (a killed worker or machine): mark it Crashed so it does not "
                    "stay Running forever. Created by `flywheel deploy` (settings: deploy.*).",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", "prefect.flow-run.Completed", "prefect.flow-run.Failed",
                    "prefect.flow-run.Cancelled", "prefect.flow-run.Crashed"},
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=config.crashed_after_seconds),
        ),
        actions=[ChangeFlowRunState(
            state=StateType.CRASHED,
            message=f"no heartbeat for {config.crashed_after_seconds} s: the run's process is gone "
                    "(marked by the flywheel crash-detection automation)",
        )],
    )
    return str(automation.create().id)


def deploy(settings: Settings, path: Path = DEPLOYMENTS_FILE, echo: Echo = print) -> DeployReport:
    """Pools, deployments, crash detection on the configured server (see the module docstring)."""
    api_url = resolve_api_url(settings)
    os.environ["PREFECT_API_URL"] = api_url  # the client calls below go there, not to an ephemeral server
    pools = read_work_pools(path)
    created, updated = [], []
    for pool in pools:
        outcome = ensure_work_pool(pool, settings.deploy.heartbeat_seconds)
        echo(f"work pool {pool}: {outcome}")
        {"created": created, "updated": updated}.get(outcome, []).append(pool)
    echo(f"registering the deployments of {path} (prefect deploy --all) ...")
    names = register_deployments(path, api_url)
    automation_id = ensure_crash_detection(settings.deploy)
    return DeployReport(api_url, created, updated, names, automation_id)
