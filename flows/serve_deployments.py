"""Serve the project's deployments from one process: `python -m flows.serve_deployments --profile P ...`.

`flywheel up` starts it next to the Prefect server. The deployments are those of deployments/prefect.yaml
(one source for `prefect deploy` with a worker and for this local `serve()`): entrypoint, description,
parameters, schedules, concurrency limits and event triggers (training runs on `flywheel.retrain.requested`,
rollout on `flywheel.model.challenger-registered`) are read from there; this process adds what depends on the
settings: the profile and config folder every run loads, and the schedules they own (configs/triggers.yaml,
`batch.cron` for batch scoring, `retention.cron` for retention).
A deployment whose entrypoint file does not exist yet is skipped with a warning.

Once every deployment is registered it writes `--ready-file` (JSON: its pid and the deployment names),
then polls for runs until SIGTERM/SIGINT, when it pauses its deployments (Prefect's `serve()` behaviour)
and exits; the next start un-pauses them (`paused=False`).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import logging
import os
import sys
import time
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from flywheel.credentials import require_credentials
from flywheel.settings import Settings, apply_runtime_environment, load_settings

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEPLOYMENTS_FILE = PROJECT_ROOT / "deployments" / "prefect.yaml"
log = logging.getLogger("flywheel.serve_deployments")
API_WAIT_SECONDS = 300.0  # `flywheel up` gives up on the server sooner (stack.start_timeout_seconds)


def _schedules_from_settings(settings: Settings) -> dict[str, Any]:
    """Deployment name -> the schedule the settings own: configs/triggers.yaml's schedules, and `batch.cron`
    for batch scoring (prefect.yaml repeats them for `prefect deploy`; a test compares)."""
    from flywheel.trigger_policy import DeploymentSchedule, deployment_schedules, load_policy

    owned = deployment_schedules(load_policy(settings.resolve(settings.triggers.policy_file)), settings.batch.cron)
    owned["retention"] = DeploymentSchedule(cron=settings.retention.cron, timezone="UTC", active=True)
    return owned


def load_deployment_specs(path: Path = DEPLOYMENTS_FILE) -> list[dict[str, Any]]:
    spec = yaml.safe_load(path.read_text()) or {}
    deployments = spec.get("deployments") or []
    if not isinstance(deployments, list):
        raise ValueError(f"{path}: `deployments` must be a list")
    return deployments


def _with_run_settings(parameters: dict[str, Any], run_settings: dict[str, str]) -> dict[str, Any]:
    """Add profile/config_dir to the flow's `params` model (a trigger's parameters replace the deployment's
    whole `params`, so both need them)."""
    out = dict(parameters)
    params = dict(out.get("params") or {})
    for key, value in run_settings.items():
        params.setdefault(key, value)
    out["params"] = params
    return out


def _params_model(flow: Any) -> type[BaseModel] | None:
    """The pydantic model of the flow's `params` argument (house style: one model per flow), if any."""
    hint = typing.get_type_hints(flow.fn).get("params")
    for candidate in (hint, *typing.get_args(hint)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _check_param_keys(where: str, parameters: dict[str, Any], model: type[BaseModel] | None) -> None:
    """Fail at start-up on a key the flow's params model does not have: pydantic would drop it silently."""
    if model is None:
        return
    unknown = set(parameters.get("params") or {}) - set(model.model_fields)
    if unknown:
        raise ValueError(f"{where}: params {sorted(unknown)} are not fields of {model.__name__} "
                         f"(fields: {sorted(model.model_fields)})")


def build_deployments(settings: Settings, profile: str, config_dir: str,
                      path: Path = DEPLOYMENTS_FILE) -> list[Any]:
    """RunnerDeployments for every deployment of `path` whose flow exists."""
    from prefect.events import DeploymentTriggerTypes
    from prefect.schedules import Schedule
    from pydantic import TypeAdapter

    root = path.resolve().parents[1]  # entrypoints are relative to the project holding deployments/
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    run_settings = {"profile": profile, "config_dir": config_dir}
    owned = _schedules_from_settings(settings)
    out = []
    for dep in load_deployment_specs(path):
        name, entrypoint = dep["name"], dep["entrypoint"]
        file, _, func = entrypoint.partition(":")
        if not (root / file).is_file():
            log.warning("deployment %s: %s does not exist yet; not served", name, file)
            continue
        module = importlib.import_module(file.removesuffix(".py").replace("/", "."))
        flow = getattr(module, func)

        if name in owned:
            schedules = [Schedule(cron=owned[name].cron, timezone=owned[name].timezone, active=owned[name].active)]
        else:
            schedules = [Schedule(cron=sched["cron"], timezone=sched.get("timezone", "UTC"),
                                  active=sched.get("active", True)) for sched in dep.get("schedules") or []]

        description = _with_schedule_note(dep.get("description"), schedules)
        model = _params_model(flow)
        parameters = _with_run_settings(dep.get("parameters") or {}, run_settings)
        _check_param_keys(f"{path}: deployment {name}", parameters, model)
        triggers = []
        for i, trig in enumerate(dep.get("triggers") or []):
            trig = dict(trig)
            if trig.get("parameters"):
                trig["parameters"] = _with_run_settings(trig["parameters"], run_settings)
                _check_param_keys(f"{path}: deployment {name}, trigger {i}", trig["parameters"], model)
            triggers.append(TypeAdapter(DeploymentTriggerTypes).validate_python(trig))

        out.append(flow.to_deployment(
            name=name,
            concurrency_limit=_concurrency_limit(dep.get("concurrency_limit")),
            description=description,
            parameters=parameters,
            schedules=schedules or None,
            triggers=triggers or None,
            paused=False,  # a previous serve() paused them on shutdown
            tags=["flywheel", settings.profile],
        ))
    return out


def _with_schedule_note(description: str | None, schedules: list[Any]) -> str | None:
    """Say which schedules are off: the UI draws an inactive cron like an active one, but for its toggle."""
    off = [f"`{s.cron}` ({s.timezone})" for s in schedules if not s.active]
    if not off:
        return description
    note = (f"Inactive schedule: {', '.join(off)}; turn it on in configs/triggers.yaml (schedules) or with the "
            "schedule's toggle here.")
    return f"{description} {note}" if description else note


def _concurrency_limit(spec: int | dict[str, Any] | None) -> Any:
    """prefect.yaml's `concurrency_limit` (an int, or limit + collision_strategy) for `to_deployment`: `prefect
    deploy` reads that key, `serve()` does not. The training deployment's is 1 with ENQUEUE: a run requested
    while one trains waits in AwaitingConcurrencySlot instead of being dropped (CANCEL_NEW would drop it)."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig

    if spec is None or isinstance(spec, int):
        return spec
    return ConcurrencyLimitConfig.model_validate(spec)


def _wait_for_api(seconds: float) -> None:
    """`flywheel up` starts this process with the server: import the flows meanwhile, then wait for it."""
    import httpx
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        return  # no server configured: Prefect starts an ephemeral one
    deadline = time.monotonic() + seconds
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"the Prefect API at {url} did not answer /health within {seconds:.0f} s")
        time.sleep(0.5)


def serve_forever(deployments: list[Any], ready_file: Path | None) -> None:
    """Prefect's `serve()`, plus the ready file once the deployments are registered."""
    from prefect.exceptions import TerminationSignal
    from prefect.runner import Runner

    _wait_for_api(API_WAIT_SECONDS)
    runner = Runner(pause_on_shutdown=True)
    ids = [runner.add_deployment(d) for d in deployments]  # registers them with the API
    names = [f"{d.flow_name}/{d.name}" for d in deployments]
    log.info("serving %d deployment(s): %s", len(ids), ", ".join(names))
    if ready_file:
        ready_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = ready_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"pid": os.getpid(), "deployments": names, "ids": [str(i) for i in ids]}))
        tmp.replace(ready_file)
    try:
        asyncio.run(runner.start())
    except (KeyboardInterrupt, TerminationSignal) as exc:
        log.info("received %s, shutting down", type(exc).__name__)
    finally:
        if ready_file:
            ready_file.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flows.serve_deployments", description=__doc__.splitlines()[0])
    parser.add_argument("--profile", "-p", default=None)
    parser.add_argument("--config-dir", default=None)
    parser.add_argument("--deployments-file", type=Path, default=DEPLOYMENTS_FILE)
    parser.add_argument("--ready-file", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    settings = load_settings(profile=args.profile, config_dir=args.config_dir)
    require_credentials(settings, "flows")
    apply_runtime_environment(settings)
    config_dir = str(Path(args.config_dir).resolve()) if args.config_dir else str(settings.paths.home / "configs")
    serve_forever(build_deployments(settings, settings.profile, config_dir, args.deployments_file), args.ready_file)


if __name__ == "__main__":
    main()
