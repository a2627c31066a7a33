"""Compose parity, without a Docker engine: each of the project's services of docker-compose.yml is started
natively with that service's own `command` and `environment`, translated the way the containers would see
their world here (service host names -> 127.0.0.1, published ports -> free ones, the image's /app -> this
checkout and a temp home, volumes -> temp folders, the compose databases and roles -> throwaway ones made by
the postgres container's own init script, Redis -> a redis-server of the test's own, the object store -> a
moto S3 server on a free port), started in `depends_on` order, each waited on with its own declared health
check. Then the loop runs through it: the `deploy` job registered the deployments, a deployment run started
from the CLI is picked up by the `worker`, trains and registers churn v1 as champion through the MLflow
server (basic auth, artifacts in the S3 bucket), and the `service`, connected as the application role,
serves it, and a signed `POST /hooks/retrain` to the `webhook` receiver starts a run of the training deployment.
Prefect and MLflow answer 401 without credentials. A wrong variable, command or volume in the compose file fails
here. Every process is started in its own session and killed by pid."""

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
from tests.production.conftest import PrivateRedis, postgres_or_skip

pytestmark = [pytest.mark.production, pytest.mark.integration, pytest.mark.slow]
BIN = Path(sys.executable).parent
# the machine's PostgreSQL trusts 127.0.0.1 (database passwords unused); moto takes any keys
SECRETS = {"POSTGRES_PASSWORD": "unused-trust-auth", "FLYWHEEL_ADMIN_TOKEN": f"tok-{uuid.uuid4().hex}",
           "FLYWHEEL_WEBHOOK_SECRET": f"sec-{uuid.uuid4().hex}",
           "GRAFANA_ADMIN_PASSWORD": "unused-grafana-is-not-started-here",
           "POSTGRES_OWNER_PASSWORD": "unused-trust-auth-owner", "POSTGRES_APP_PASSWORD": "unused-trust-auth-app",
           "PREFECT_API_AUTH_STRING": f"flywheel:pf-{uuid.uuid4().hex}",
           "MLFLOW_TRACKING_USERNAME": "flywheel", "MLFLOW_TRACKING_PASSWORD": f"ml-{uuid.uuid4().hex}",
           "MLFLOW_FLASK_SERVER_SECRET_KEY": f"csrf-{uuid.uuid4().hex}",
           "S3_ACCESS_KEY": "parity-test-key", "S3_SECRET_KEY": f"s3-{uuid.uuid4().hex}"}
# not the compose file's business, only this machine's: a loaded 2-core CI box (as tests/production/conftest.py)
TEST_ONLY = {"FLYWHEEL_TRAIN__SEARCH__TRIALS": "1",
             "FLYWHEEL_EVALUATE__GATE_OVERRIDES": "{latency: {service_budget_ms: 60}}",
             "FLYWHEEL_SERVE__REGISTRY_POLL_SECONDS": "1"}
START_BUDGET_S, RUN_BUDGET_S = 300, 900


class Translation:
    """How a compose value reads on this machine."""

    def __init__(self, compose: dict[str, Any], home: Path, volumes: Path, dbs: dict[str, str], roles: dict[str, str],
                 redis_port: int):
        self.home, self.dbs, self.roles, self.redis_port = home, dbs, roles, redis_port
        self.volumes = {name: volumes / name for name in compose.get("volumes", {})}
        # a named volume's mount point outside the image's /app (e.g. /mlflow-auth) -> its temp folder
        self.mounts = {target: self.volumes[source] for svc in compose["services"].values()
                       for source, target in (v.split(":")[:2] for v in svc.get("volumes", []))
                       if source in self.volumes and not target.startswith("/app")}
        # every (service, container port) another service or its own health check may name -> a free port
        self.ports: dict[tuple[str, int], int] = {}
        for name, svc in compose["services"].items():
            found = {int(p.split(":")[-1]) for p in svc.get("ports", [])}
            found |= {int(m) for m in re.findall(r"127\.0\.0\.1:(\d+)/", json.dumps(svc.get("healthcheck", {})))}
            for port in found:
                self.ports[(name, port)] = free_port()

    def text(self, value: str, own: str) -> str:
        value = re.sub(r"://(\w+):([^@\s]*)@postgres:5432/(\w+)",
                       lambda m: f"://{self.roles.get(m.group(1), m.group(1))}:{m.group(2)}@127.0.0.1:5432/"
                                 f"{self.dbs[m.group(3)]}", value)
        value = value.replace("redis:6379", f"127.0.0.1:{self.redis_port}")
        for (svc, port), free in self.ports.items():
            value = value.replace(f"{svc}:{port}", f"127.0.0.1:{free}")
            if svc == own:
                value = value.replace(f"127.0.0.1:{port}", f"127.0.0.1:{free}")
        value = value.replace("/app/configs", str(self.home / "configs"))
        for target, folder in self.mounts.items():
            value = value.replace(target, str(folder))
        return value.replace("/app", str(PROJECT))

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
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "FLYWHEEL_", "MLFLOW_", "AWS_"))}
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


INIT_SCRIPT = PROJECT / "deployments" / "postgres-init.sh"


@contextmanager
def compose_databases() -> Iterator[tuple[dict[str, str], dict[str, str]]]:
    """The postgres container's init script, run on the machine's PostgreSQL with every database and role renamed
    to a throwaway one (the same SQL, the same psql variables): (database -> throwaway, role -> throwaway).
    Dropped at the end, databases before roles."""
    import psycopg

    postgres_or_skip()
    script = INIT_SCRIPT.read_text()
    sql = re.search(r"<<'SQL'\n(.*?)\nSQL\n", script, re.S).group(1)
    variables = re.findall(r"-v (\w+)=\"\$(\w+)\"", script)
    tag = uuid.uuid4().hex[:8]
    dbs = {name: f"{name}_t{tag}" for name in re.findall(r"CREATE DATABASE (\w+)", sql)}
    roles = {name: f"{name}_t{tag}" for name in re.findall(r"CREATE ROLE (\w+)", sql)}
    for old, new in {**dbs, **roles}.items():
        sql = re.sub(rf"\b{old}\b", new, sql)
    admin = "host=127.0.0.1 user=postgres dbname=postgres"
    try:
        done = subprocess.run(["psql", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-U", "postgres", "-d", "postgres",
                               *[a for var, env in variables for a in ("-v", f"{var}={SECRETS[env]}")]],
                              input=sql, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, f"the init script's SQL failed: {done.stderr}"
        yield dbs, roles
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            for db in dbs.values():
                conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
            for role in roles.values():
                conn.execute(f'DROP ROLE IF EXISTS "{role}"')


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
    assert externals == {"postgres", "redis", "objectstore"}, f"services this test cannot run natively: {externals}"
    with ExitStack() as stack:
        dbs, roles = stack.enter_context(compose_databases())
        redis = PrivateRedis(tmp / "redis")
        redis.folder.mkdir()
        redis.start()
        stack.callback(redis.stop)
        home = make_home(tmp / "home")
        volumes = tmp / "volumes"
        tr = Translation(compose, home, volumes, dbs, roles, redis.port)
        for path in tr.volumes.values():
            path.mkdir(parents=True)
        # the object store: moto's S3 server where compose publishes MinIO's API (its image cannot run here)
        from moto.server import ThreadedMotoServer

        s3 = ThreadedMotoServer(ip_address="127.0.0.1", port=tr.ports[("objectstore", 9000)], verbose=False)
        s3.start()
        stack.callback(s3.stop)
        procs: dict[str, subprocess.Popen[bytes]] = {}
        for name in start_order({n: {"depends_on": {d: c for d, c in (s.get("depends_on") or {}).items()
                                                    if d in services}} for n, s in services.items()}):
            svc = services[name]
            log = (tmp / f"{name}.log").open("ab")
            cwd = tr.text(svc["working_dir"], name) if svc.get("working_dir") else home
            proc = subprocess.Popen(tr.argv(name, svc), env=tr.env(name, svc, services), cwd=cwd, stdout=log,
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
        yield {"tr": tr, "home": home, "procs": procs, "tmp": tmp, "services": services, "roles": roles}


def _url(tr: Translation, service: str, port: int) -> str:
    return f"http://127.0.0.1:{tr.ports[(service, port)]}"


def test_the_compose_stack_run_natively_trains_through_its_worker_and_serves_the_champion(tmp_path: Path) -> None:
    from flywheel.datagen import GeneratorSpec, write_batches

    with compose_natively(tmp_path) as stack:
        tr, home, tmp = stack["tr"], stack["home"], stack["tmp"]
        api = f"{_url(tr, 'prefect-server', 4200)}/api"
        prefect_auth = tuple(SECRETS["PREFECT_API_AUTH_STRING"].split(":", 1))
        mlflow = _url(tr, "mlflow", 5000)
        # auth is on: without credentials both servers refuse (their health checks stay open)
        assert httpx.post(f"{api}/deployments/filter", json={}, timeout=10).status_code == 401
        assert httpx.post(f"{api}/deployments/filter", json={}, timeout=10,
                          auth=(prefect_auth[0], "wrong-password")).status_code == 401
        assert httpx.get(f"{mlflow}/api/2.0/mlflow/registered-models/search", timeout=30).status_code == 401
        # the data tests/production/test_service_redis.py trains a champion on, on this profile
        write_batches(GeneratorSpec(seed=5, days=21, rows_per_day=300, customers=3000),
                      home / "data" / "incoming" / "churn")
        done = subprocess.run([str(BIN / "prefect"), "deployment", "run", "training-pipeline/training",
                               "--param", "params={}"],
                              env={**os.environ, "PREFECT_API_URL": api,
                                   "PREFECT_API_AUTH_STRING": SECRETS["PREFECT_API_AUTH_STRING"]},
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
        run_id = re.search(r"UUID: ([0-9a-f-]{36})", done.stdout).group(1)

        deadline = time.monotonic() + RUN_BUDGET_S
        while True:
            state = httpx.get(f"{api}/flow_runs/{run_id}", timeout=10, auth=prefect_auth).json()["state"]
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
        _the_model_lives_in_the_bucket(tr, stack["services"], mlflow)
        _the_services_connect_as_the_application_role(tr, stack["roles"])
        _a_signed_webhook_starts_a_retrain(tr, api, prefect_auth)


def _a_signed_webhook_starts_a_retrain(tr: Translation, api: str, auth: tuple[str, ...]) -> None:
    """A signed `POST /hooks/retrain` to the compose stack's receiver is accepted (202), and the training
    deployment's trigger (registered by the `deploy` job) creates one run of it carrying the request's reason (the
    worker takes it; the test stops at its creation and parameters)."""
    from flywheel.hmacsig import DELIVERY_HEADER, SIGNATURE_HEADER, signature_header

    (training,) = httpx.post(f"{api}/deployments/filter", json={"deployments": {"name": {"any_": ["training"]}}},
                             auth=auth, timeout=10).json()

    def runs() -> list[dict[str, Any]]:
        return httpx.post(f"{api}/flow_runs/filter", auth=auth, timeout=10,
                          json={"flow_runs": {"deployment_id": {"any_": [training["id"]]}}}).json()

    before = {r["id"] for r in runs()}
    raw = json.dumps({"reason": "parity: labels reviewed"}).encode()
    delivery = f"parity-{uuid.uuid4().hex[:12]}"
    sig = signature_header([SECRETS["FLYWHEEL_WEBHOOK_SECRET"]], int(time.time()), delivery, raw)
    sent = httpx.post(f"{_url(tr, 'webhook', 8090)}/hooks/retrain", content=raw, timeout=30, headers={
        "Content-Type": "application/json", DELIVERY_HEADER: delivery, SIGNATURE_HEADER: sig})
    assert sent.status_code == 202, sent.text
    deadline = time.monotonic() + 180
    while not (new := [r for r in runs() if r["id"] not in before]):
        assert time.monotonic() < deadline, "the signed webhook started no run of the training deployment"
        time.sleep(1)
    assert len(new) == 1, [r["id"] for r in new]
    assert new[0]["parameters"]["params"]["reason"] == "parity: labels reviewed", new[0]["parameters"]


def _the_model_lives_in_the_bucket(tr: Translation, services: dict[str, Any], mlflow: str) -> None:
    """The champion's files are objects of the bucket the `buckets` job made, logged through the MLflow server
    (the worker holds no key of the store), and load back through it with the stack's credentials."""
    import boto3

    auth = (SECRETS["MLFLOW_TRACKING_USERNAME"], SECRETS["MLFLOW_TRACKING_PASSWORD"])
    found = httpx.get(f"{mlflow}/api/2.0/mlflow/model-versions/get", params={"name": "churn", "version": "1"},
                      auth=auth, timeout=30)
    assert found.status_code == 200, found.text
    source = found.json()["model_version"]["source"]
    model_id = source.rsplit("/", 1)[-1] if source.startswith("models:/") else ""  # models:/m-<id>
    bucket = re.search(r"s3://([\w-]+)", services["mlflow"]["command"]).group(1)
    s3 = boto3.client("s3", endpoint_url=_url(tr, "objectstore", 9000), region_name="us-east-1",
                      aws_access_key_id=SECRETS["S3_ACCESS_KEY"], aws_secret_access_key=SECRETS["S3_SECRET_KEY"])
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
            for o in page.get("Contents", [])]
    assert any(k.endswith(f"{model_id}/artifacts/MLmodel") for k in keys), f"{source} not in s3://{bucket}: {keys[:20]}"
    loaded = subprocess.run(
        [sys.executable, "-c", "import mlflow, sys; m = mlflow.sklearn.load_model('models:/churn/1'); "
                               "print(type(m).__name__)"],
        env={**{k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_"))},
             "MLFLOW_TRACKING_URI": mlflow, "MLFLOW_TRACKING_USERNAME": auth[0], "MLFLOW_TRACKING_PASSWORD": auth[1]},
        capture_output=True, text=True, timeout=300)
    assert loaded.returncode == 0 and loaded.stdout.strip(), loaded.stderr[-3000:]


def _the_services_connect_as_the_application_role(tr: Translation, roles: dict[str, str]) -> None:
    """The service and the webhook receiver hold sessions to the project's database as the application role,
    which may not rewrite the audit log (tests/production/test_db_roles.py tries every way)."""
    import psycopg

    from flywheel.audit import TABLE

    app, db = roles["flywheel_app"], tr.dbs["flywheel"]
    with psycopg.connect("host=127.0.0.1 user=postgres dbname=postgres") as conn:
        users = {r[0] for r in conn.execute("SELECT usename FROM pg_stat_activity WHERE datname = %s", (db,))}
        assert users == {app}, f"sessions on {db}: {users} (only {app}, the owner ran only the migration)"
    with psycopg.connect(f"host=127.0.0.1 user={app} dbname={db}", autocommit=True) as conn, \
            pytest.raises(psycopg.errors.InsufficientPrivilege, match="permission denied"):
        conn.execute(f"DELETE FROM {TABLE}")
