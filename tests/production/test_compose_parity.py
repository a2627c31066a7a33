"""Compose parity, without a Docker engine: each of the project's services of docker-compose.yml is started
natively with that service's own `command` and `environment`, translated the way the containers would see
their world here (service host names -> 127.0.0.1, published ports -> free ones, the image's /app -> this
checkout and a temp home, volumes -> temp folders, the compose databases -> throwaway PostgreSQL databases,
Redis -> a redis-server of the test's own), started in `depends_on` order, each waited on with its own
declared health check. Then the loop runs through it: the `deploy` job registered the deployments, a
deployment run started from the CLI is picked up by the `worker`, trains and registers churn v1 as champion,
and the `service` serves it. A wrong variable, command or volume in the compose file fails here.
Every process is started in its own session and killed by pid."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import yaml

from tests.conftest import PROJECT, make_home
from tests.e2e.stackproc import free_port
from tests.production.conftest import PrivateRedis, throwaway_database

pytestmark = [pytest.mark.production, pytest.mark.integration, pytest.mark.slow]
BIN = Path(sys.executable).parent
SECRETS = {"POSTGRES_PASSWORD": "unused-trust-auth", "FLYWHEEL_ADMIN_TOKEN": f"tok-{uuid.uuid4().hex}",
           "FLYWHEEL_WEBHOOK_SECRET": f"sec-{uuid.uuid4().hex}",
           "GRAFANA_ADMIN_PASSWORD": "unused-grafana-is-not-started-here"}
# not the compose file's business, only this machine's: a loaded 2-core CI box (as tests/production/conftest.py)
TEST_ONLY = {"FLYWHEEL_TRAIN__SEARCH__TRIALS": "1",
             "FLYWHEEL_EVALUATE__GATE_OVERRIDES": "{latency: {service_budget_ms: 60}}",
             "FLYWHEEL_SERVE__REGISTRY_POLL_SECONDS": "1"}
START_BUDGET_S, RUN_BUDGET_S = 300, 900


class Translation:
    """How a compose value reads on this machine."""

    def __init__(self, compose: dict[str, Any], home: Path, volumes: Path, dbs: dict[str, str], redis_port: int):
        self.home, self.dbs, self.redis_port = home, dbs, redis_port
        self.volumes = {name: volumes / name for name in compose.get("volumes", {})}
        # every (service, container port) another service or its own health check may name -> a free port
        self.ports: dict[tuple[str, int], int] = {}
        for name, svc in compose["services"].items():
            found = {int(p.split(":")[-1]) for p in svc.get("ports", [])}
            found |= {int(m) for m in re.findall(r"127\.0\.0\.1:(\d+)/", json.dumps(svc.get("healthcheck", {})))}
            for port in found:
                self.ports[(name, port)] = free_port()

    def text(self, value: str, own: str) -> str:
        value = re.sub(r"@postgres:5432/(\w+)", lambda m: f"@127.0.0.1:5432/{self.dbs[m.group(1)]}", value)
        value = value.replace("redis:6379", f"127.0.0.1:{self.redis_port}")
        for (svc, port), free in self.ports.items():
            value = value.replace(f"{svc}:{port}", f"127.0.0.1:{free}")
            if svc == own:
                value = value.replace(f"127.0.0.1:{port}", f"127.0.0.1:{free}")
        value = value.replace("/app/configs", str(self.home / "configs"))
        return value.replace("/mlartifacts", str(self.volumes["mlartifacts"])).replace("/app", str(PROJECT))

    def argv(self, name: str, svc: dict[str, Any]) -> list[str]:
        argv = [self.text(a, name) for a in shlex.split(svc["command"])]
        if "--port" in argv:
            i = argv.index("--port") + 1
            argv[i] = str(self.ports[(name, int(argv[i]))])
        argv = ["127.0.0.1" if a == "0.0.0.0" else a for a in argv]
        if argv[0] == "python":
            argv[0] = sys.executable
        elif argv[0] in ("prefect", "mlflow", "flywheel"):
            argv[0] = str(BIN / argv[0])
        return argv

    def env(self, name: str, svc: dict[str, Any], services: dict[str, Any]) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "FLYWHEEL_", "MLFLOW_"))}
        env.update({k: self.text(str(v), name) for k, v in (svc.get("environment") or {}).items()})
        if env.get("FLYWHEEL_SERVE__HOST") in services:  # the service by its compose name: its port follows
            target = env["FLYWHEEL_SERVE__HOST"]
            port = int(shlex.split(services[target]["command"])[-1])
            env.update(FLYWHEEL_SERVE__HOST="127.0.0.1", FLYWHEEL_SERVE__PORT=str(self.ports[(target, port)]))
        if "--with-healthcheck" in svc.get("command", ""):  # the worker's health server, on its own port
            env["PREFECT_WORKER_WEBSERVER_PORT"] = str(self.ports[(name, 8080)])
        env["PREFECT_HOME"] = str(self.prefect_home(name))  # a container's own; never this machine's ~/.prefect
        return {**env, **(TEST_ONLY if env.get("FLYWHEEL_PROFILE") else {})}

    def prefect_home(self, name: str) -> Path:
        path = self.home.parent / f"{name}-prefect-home"
        path.mkdir(exist_ok=True)
        return path

    def healthcheck(self, name: str, svc: dict[str, Any]) -> list[str] | None:
        test = (svc.get("healthcheck") or {}).get("test")
        if not test:
            return None
        assert test[0] == "CMD" and test[1] == "python", f"{name}: a health check this test can run natively"
        return [sys.executable, *[self.text(a, name) for a in test[2:]]]


def start_order(services: dict[str, Any]) -> list[str]:
    order: list[str] = []
    while len(order) < len(services):
        ready = [n for n, s in services.items() if n not in order and set(s.get("depends_on") or {}) <= set(order)]
        assert ready, f"a depends_on cycle among {set(services) - set(order)}"
        order += sorted(ready)
    return order


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the process and everything it started (each in its own group), by pid."""
    with suppress(psutil.NoSuchProcess):
        root = psutil.Process(proc.pid)
        for p in [*root.children(recursive=True), root]:
            with suppress(ProcessLookupError, PermissionError):
                os.killpg(os.getpgid(p.pid), signal.SIGKILL)
            with suppress(psutil.NoSuchProcess):
                p.kill()
    with suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=30)


@contextmanager
def compose_natively(tmp: Path) -> Iterator[dict[str, Any]]:
    text = (PROJECT / "docker-compose.yml").read_text()
    compose = yaml.safe_load(re.sub(r"\$\{(\w+)(:\?[^}]*)?\}", lambda m: SECRETS[m.group(1)], text))
    services = {n: s for n, s in compose["services"].items() if s.get("build") == "."}  # the project's own
    # Prometheus and Grafana images cannot run here: their configuration is checked statically
    # (tests/unit/test_compose.py, tests/unit/test_monitoring_exporter.py)
    externals = set(compose["services"]) - set(services) - {"prometheus", "grafana"}
    assert externals == {"postgres", "redis"}, f"services this test does not know how to run natively: {externals}"
    databases = re.findall(r"CREATE DATABASE (\w+);", (PROJECT / "deployments" / "postgres-init.sql").read_text())
    with ExitStack() as stack:
        dbs = {db: stack.enter_context(throwaway_database(db)).rsplit("/", 1)[1] for db in databases}
        redis = PrivateRedis(tmp / "redis")
        redis.folder.mkdir()
        redis.start()
        stack.callback(redis.stop)
        home = make_home(tmp / "home")
        volumes = tmp / "volumes"
        tr = Translation(compose, home, volumes, dbs, redis.port)
        for path in tr.volumes.values():
            path.mkdir(parents=True)
        procs: dict[str, subprocess.Popen[bytes]] = {}
        for name in start_order({n: {"depends_on": {d: c for d, c in (s.get("depends_on") or {}).items()
                                                    if d in services}} for n, s in services.items()}):
            svc = services[name]
            log = (tmp / f"{name}.log").open("ab")
            proc = subprocess.Popen(tr.argv(name, svc), env=tr.env(name, svc, services), cwd=home, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
            stack.callback(stop, proc)
            procs[name] = proc
            if svc.get("restart") == "no":  # a one-shot job: its dependents wait for it to complete
                code = proc.wait(timeout=START_BUDGET_S * 3)
                assert code == 0, f"{name} exited {code}: {(tmp / f'{name}.log').read_text()[-3000:]}"
                continue
            check = tr.healthcheck(name, svc)
            deadline = time.monotonic() + START_BUDGET_S
            while check and subprocess.run(check, capture_output=True, timeout=60).returncode != 0:
                assert proc.poll() is None, f"{name} exited: {(tmp / f'{name}.log').read_text()[-3000:]}"
                assert time.monotonic() < deadline, f"{name} not healthy: {(tmp / f'{name}.log').read_text()[-3000:]}"
                time.sleep(2)
        yield {"tr": tr, "home": home, "procs": procs, "tmp": tmp, "services": services}


def _url(tr: Translation, service: str, port: int) -> str:
    return f"http://127.0.0.1:{tr.ports[(service, port)]}"


def test_the_compose_stack_run_natively_trains_through_its_worker_and_serves_the_champion(tmp_path: Path) -> None:
    from flywheel.datagen import GeneratorSpec, write_batches

    with compose_natively(tmp_path) as stack:
        tr, home, tmp = stack["tr"], stack["home"], stack["tmp"]
        api = f"{_url(tr, 'prefect-server', 4200)}/api"
        # the data tests/production/test_service_redis.py trains a champion on, on this profile
        write_batches(GeneratorSpec(seed=5, days=21, rows_per_day=300, customers=3000),
                      home / "data" / "incoming" / "churn")
        done = subprocess.run([str(BIN / "prefect"), "deployment", "run", "training-pipeline/training",
                               "--param", "params={}"], env={**os.environ, "PREFECT_API_URL": api},
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
        run_id = re.search(r"UUID: ([0-9a-f-]{36})", done.stdout).group(1)

        deadline = time.monotonic() + RUN_BUDGET_S
        while True:
            state = httpx.get(f"{api}/flow_runs/{run_id}", timeout=10).json()["state"]
            if state["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                break
            assert stack["procs"]["worker"].poll() is None, (tmp / "worker.log").read_text()[-3000:]
            assert time.monotonic() < deadline, f"run still {state['name']}"
            time.sleep(3)
        assert state["name"] == "Completed", f"{state['name']}: {state['message']}\n" \
                                            f"{(tmp / 'worker.log').read_text()[-3000:]}"

        service = _url(tr, "service", 8080)
        deadline = time.monotonic() + 120
        while (health := httpx.get(f"{service}/health", timeout=10)).status_code != 200:
            assert time.monotonic() < deadline, health.text
            time.sleep(1)
        import pandas as pd

        ids = pd.read_parquet(home / "data" / "offline" / "churn" / "features.parquet")["customer_id"].head(3)
        answer = httpx.post(f"{service}/predict", json={"entities": [int(i) for i in ids]}, timeout=30)
        assert answer.status_code == 200, answer.text
        assert {p["version"] for p in answer.json()["predictions"]} == {"1"}, "the champion the worker registered"
        webhook = httpx.get(f"{_url(tr, 'webhook', 8090)}/health", timeout=10)
        assert webhook.status_code == 200 and webhook.json()["ok"], webhook.text
