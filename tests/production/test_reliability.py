"""Reliability of the stores under concurrency and under a database restart (production profile).

- Eight training runs of the same model started at once, each a direct flow call in its own process (through the
  deployment they would queue one by one: the point here is the stores): a Prefect server and an MLflow tracking
  server, both on PostgreSQL, the project tables on PostgreSQL, Feast online on a Redis of the test's own. One
  version for the one (data digest, config digest), at most one alias move and an audit row for it, every process
  exits 0, no "database is locked", no 5xx from either server. A sampler hits both APIs during the runs and the
  test prints their p99.
- PostgreSQL restarted during a training run (a private cluster made with initdb on a free port, stopped by pid):
  MLflow's store and the project tables go away for a few seconds; the I/O tasks retry and the run completes with
  exactly one version, whole (digests verify, alias and audit row present), or it fails naming the database and
  registers nothing half-written.
- The same eight trainings on the local profile's stores (MLflow, project tables and Feast online on SQLite
  files; Prefect still the PostgreSQL-backed server): no "database is locked", one version.

Each database, server and cluster is the test's own and is dropped or stopped (by pid) at the end.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.benchmarks.bench_training import start_prefect_server, stop
from tests.conftest import PROJECT, make_home
from tests.production.conftest import PrivateRedis, postgres_or_skip, throwaway_database
from tests.production.pgcluster import PrivatePostgres, free_port, skip_reason

pytestmark = [pytest.mark.production, pytest.mark.integration, pytest.mark.slow]

BIN = Path(sys.executable).parent
RUNS = 8
RUN_BUDGET_S = 900  # eight trainings at once on a busy 2-core machine: imports alone take a minute or more
AS_OF = datetime(2026, 3, 1, tzinfo=UTC)  # one as-of for every run: the same data, so the same data digest
LOCKED = "database is locked"
SERVER_ERROR = re.compile(r"retryable status code 5\d\d|Internal Server Error|Service Unavailable")
ACCESS_5XX = re.compile(r'HTTP/1\.[01]" 5\d\d')

# one training, as a process of its own; prints its outcome as one JSON line
TRAIN_SCRIPT = """
import json, sys
from datetime import datetime
from flows.training import TrainingParams, training_pipeline
state = training_pipeline(TrainingParams(profile=sys.argv[3], config_dir=sys.argv[1],
                                         as_of=datetime.fromisoformat(sys.argv[2])), return_state=True)
result = state.result(raise_on_failure=False)
out = {"state": state.name, "completed": state.is_completed(), "message": state.message}
if state.is_completed():
    out.update(version=result.version, outcome=result.outcome, alias=result.alias, run_id=result.run_id)
print("TRAINING-RESULT " + json.dumps(out), flush=True)
sys.exit(0 if state.is_completed() else 1)
"""


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Prefect server on a throwaway PostgreSQL database (SQLite answers 503 under concurrent load)."""
    postgres_or_skip()
    with throwaway_database("flywheel_prefect") as url:
        proc, api, _ = start_prefect_server(tmp_path_factory.mktemp("prefect-server"),
                                            url.replace("postgresql+psycopg", "postgresql+asyncpg"))
        try:
            yield api
        finally:
            stop(proc)


@contextmanager
def mlflow_server(backend_url: str, folder: Path) -> Iterator[str]:
    """`mlflow server` on `backend_url`, on a free port, in its own session; stopped by pid."""
    port = free_port()
    log = (folder / "mlflow-server.log").open("wb")
    proc = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--backend-store-uri", backend_url, "--default-artifact-root",
         (folder / "mlartifacts").as_uri(), "--host", "127.0.0.1", "--port", str(port), "--workers", "2"],
        env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600  # a deadline, not a wait: a loaded 2-core machine took 180 s and more
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = (folder / "mlflow-server.log").read_text()[-3000:]
                raise AssertionError(f"mlflow server did not start: {tail}")
            time.sleep(0.5)
        yield url
    finally:
        stop(proc)
        log.close()


class Sampler(threading.Thread):
    """Calls each API every `every_s` while the runs go; keeps latency (ms) and status code per call."""

    def __init__(self, calls: dict[str, tuple[str, str, dict | None]], every_s: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.calls, self.every_s = calls, every_s
        self.samples: dict[str, list[tuple[float, int]]] = {name: [] for name in calls}
        self.halt = threading.Event()

    def run(self) -> None:
        with httpx.Client(timeout=30) as client:
            while not self.halt.is_set():
                for name, (method, url, body) in self.calls.items():
                    t0 = time.perf_counter()
                    try:
                        code = client.request(method, url, json=body).status_code
                    except httpx.HTTPError:
                        code = 0  # no answer at all: counted apart from 5xx, and reported
                    self.samples[name].append(((time.perf_counter() - t0) * 1000, code))
                self.halt.wait(self.every_s)

    def summary(self) -> dict[str, dict[str, float]]:
        out = {}
        for name, rows in self.samples.items():
            ms = np.array([r[0] for r in rows]) if rows else np.array([float("nan")])
            out[name] = {"calls": len(rows), "p50_ms": float(np.percentile(ms, 50)),
                         "p99_ms": float(np.percentile(ms, 99)), "max_ms": float(ms.max()),
                         "5xx": sum(1 for r in rows if r[1] >= 500), "no_answer": sum(1 for r in rows if r[1] == 0)}
        return out


def _home(tmp: Path) -> Path:
    from flywheel.datagen import GeneratorSpec, write_batches

    home = make_home(tmp)
    write_batches(GeneratorSpec(seed=3, days=21, rows_per_day=300, customers=3000),
                  home / "data" / "incoming" / "churn")
    return home


def _env(api: str, tracking_uri: str, flywheel_url: str, redis_port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "FLYWHEEL_", "MLFLOW_"))}
    return {
        **env,
        "PYTHONPATH": str(PROJECT),
        "PREFECT_API_URL": api,
        "FLYWHEEL_STORES__PREFECT_API_URL": api,
        "FLYWHEEL_STORES__MLFLOW_TRACKING_URI": tracking_uri,
        "FLYWHEEL_STORES__AUDIT_DB_URL": flywheel_url,
        "FLYWHEEL_SERVE__PREDICTION_LOG_URL": flywheel_url,
        "FLYWHEEL_STORES__FEAST_ONLINE__CONNECTION_STRING": f"127.0.0.1:{redis_port}",
        "FLYWHEEL_TRAIN__SEARCH__TRIALS": "1",
        # eight trainings share two cores: the latency gate measures the machine's load, not the model
        "FLYWHEEL_EVALUATE__GATE_OVERRIDES": "{latency: {service_budget_ms: 2000}}",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "OMP_NUM_THREADS": "1",
        # the production profile asks MLflow server clients for credentials (flywheel/credentials.py); this
        # test's server has no auth app and ignores them
        "MLFLOW_TRACKING_USERNAME": "flywheel",
        "MLFLOW_TRACKING_PASSWORD": "reliability-test-only-password",
    }


def _start_training(home: Path, env: dict[str, str], index: int, profile: str = "production"
                    ) -> tuple[subprocess.Popen[str], Path]:
    out = home / f"training-{index}.log"
    proc = subprocess.Popen([sys.executable, "-c", TRAIN_SCRIPT, str(home / "configs"), AS_OF.isoformat(), profile],
                            env=env, cwd=home, stdout=out.open("w"), stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    return proc, out


def _finish(proc: subprocess.Popen[str], deadline: float) -> int:
    try:
        return proc.wait(max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)  # by pid: its own session
        proc.wait(10)
        return -9


def _result(log: Path) -> dict | None:
    lines = [line for line in log.read_text().splitlines() if line.startswith("TRAINING-RESULT ")]
    return json.loads(lines[-1].removeprefix("TRAINING-RESULT ")) if lines else None


def _versions_by_digests(tracking_uri: str, model: str) -> dict[tuple[str, str], list[str]]:
    """(data digest, config digest) -> the versions registered from runs with those digests."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    groups: dict[tuple[str, str], list[str]] = {}
    for mv in client.search_model_versions(f"name = '{model}'"):
        tags = client.get_run(mv.run_id).data.tags
        key = (tags.get("flywheel.data_hash", "?"), tags.get("flywheel.config_digest", "?"))
        groups.setdefault(key, []).append(str(mv.version))
    return groups


def test_eight_concurrent_trainings_register_one_version(prefect_api: str, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    from flywheel.audit import AuditLog
    from flywheel.version_claims import VersionClaims

    home = _home(tmp_path / "home")
    redis = PrivateRedis(tmp_path / "redis", persist=False)
    redis.folder.mkdir()
    redis.start()
    try:
        with throwaway_database("flywheel_mlflow") as mlflow_db, throwaway_database("flywheel", migrate=True) as db, \
                mlflow_server(mlflow_db, tmp_path) as tracking:
            env = _env(prefect_api, tracking, db, redis.port)
            sampler = Sampler({
                "prefect": ("POST", f"{prefect_api}/flow_runs/filter", {"limit": 10}),
                "mlflow": ("GET", f"{tracking}/api/2.0/mlflow/registered-models/search?max_results=10", None),
            })
            sampler.start()
            started = time.monotonic()
            procs = [_start_training(home, env, i) for i in range(RUNS)]
            codes = [_finish(p, started + RUN_BUDGET_S) for p, _ in procs]
            wall = time.monotonic() - started
            sampler.halt.set()
            sampler.join(30)

            logs = {i: log.read_text() for i, (_, log) in enumerate(procs)}
            results = [_result(log) for _, log in procs]
            stats = sampler.summary()
            print(f"\n{RUNS} concurrent trainings: {wall:.0f} s wall; outcomes "
                  f"{sorted((r or {}).get('outcome', 'none') for r in results)}")
            for name, s in stats.items():
                print(f"{name} API during the runs: {s['calls']} calls, p50 {s['p50_ms']:.0f} ms, "
                      f"p99 {s['p99_ms']:.0f} ms, max {s['max_ms']:.0f} ms, 5xx {s['5xx']}, no answer {s['no_answer']}")

            # every process completed (a refusal would be a clear error naming why, and fail here with it)
            for i, code in enumerate(codes):
                assert code == 0, f"training {i} exited {code}:\n{logs[i][-4000:]}"
            assert all(r and r["completed"] for r in results), results
            # no "database is locked" anywhere, and no server answered 5xx
            for i, text in logs.items():
                assert LOCKED not in text, f"training {i}:\n{text[-3000:]}"
            for name, s in stats.items():
                assert s["5xx"] == 0, f"{name} answered 5xx during the runs: {s}"
                assert s["calls"] > 0, f"{name} was never sampled"
            for i, text in logs.items():  # Prefect's client retries a 5xx quietly: its log line says so
                assert not SERVER_ERROR.search(text), f"training {i} met a server error:\n{text[-3000:]}"
            server_log = (tmp_path / "mlflow-server.log").read_text()
            assert LOCKED not in server_log and not ACCESS_5XX.search(server_log), server_log[-3000:]

            # one version for the one (data, config); the others report it as a duplicate
            groups = _versions_by_digests(tracking, "churn")
            assert len(groups) == 1 and all(len(v) == 1 for v in groups.values()), groups
            (version,) = next(iter(groups.values()))
            outcomes = sorted(r["outcome"] for r in results)
            first = [r for r in results if r["outcome"] != "duplicate"]
            assert len(first) == 1, outcomes
            assert first[0]["outcome"] in ("champion", "rejected"), outcomes
            assert all(r["version"] == version for r in results), results
            assert VersionClaims(db).get("churn", *next(iter(groups))).version == version

            # at most one alias move, and the audit log has it; the registry's aliases are what it says
            client = MlflowClient(tracking_uri=tracking, registry_uri=tracking)
            aliases = {a: str(v) for a, v in client.get_registered_model("churn").aliases.items()}
            moves = [e for e in AuditLog(db).entries("churn") if e.alias in ("champion", "challenger")]
            assert len(moves) <= 1, moves
            assert {e.alias: e.to_version for e in moves} == aliases, (moves, aliases)
            if first[0]["outcome"] == "champion":
                assert aliases == {"champion": version}
    finally:
        redis.stop()


def _mlflow_runs(cluster: PrivatePostgres, database: str) -> int:
    """Training runs in the MLflow database (0 while its tables do not exist yet or the cluster is down)."""
    import psycopg

    try:
        with psycopg.connect(f"{cluster.dsn.replace('dbname=postgres', 'dbname=' + database)}",
                             connect_timeout=2) as conn:
            row = conn.execute("SELECT count(*) FROM runs WHERE name LIKE 'train-%'").fetchone()
            return int(row[0]) if row else 0
    except psycopg.Error:
        return 0


def test_postgres_restart_during_training(prefect_api: str, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    from flywheel import migrations
    from flywheel.audit import AuditLog
    from flywheel.registry import TAG_STATUS, Registry

    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    home = _home(tmp_path / "home")
    cluster = PrivatePostgres()
    redis = PrivateRedis(tmp_path / "redis", persist=False)
    redis.folder.mkdir()
    try:
        cluster.init()
        cluster.start()
        suffix = uuid.uuid4().hex[:8]
        mlflow_db, project_db = f"mlflow_{suffix}", f"flywheel_{suffix}"
        cluster.create_database(mlflow_db)
        cluster.create_database(project_db)
        tracking, db = cluster.url(mlflow_db), cluster.url(project_db)
        migrations.upgrade(db)
        redis.start()

        proc, log = _start_training(home, _env(prefect_api, tracking, db, redis.port), 0)
        deadline = time.monotonic() + RUN_BUDGET_S
        while _mlflow_runs(cluster, mlflow_db) == 0:  # the training's MLflow run exists: it is training now
            assert proc.poll() is None, f"training ended before its MLflow run appeared:\n{log.read_text()[-4000:]}"
            assert time.monotonic() < deadline, "the training never created its MLflow run"
            time.sleep(0.2)
        down_s = cluster.restart(pause_s=3.0)
        code = _finish(proc, deadline)
        text, result = log.read_text(), _result(log)
        runs = _mlflow_runs(cluster, mlflow_db)
        print(f"\nPostgreSQL stopped and restarted during training ({down_s:.1f} s unreachable); the run "
              f"{'completed' if code == 0 else 'failed'} ({result and result.get('outcome')}), "
              f"{runs} MLflow training run(s) (a retried training starts a new one)")

        client = MlflowClient(tracking_uri=tracking, registry_uri=tracking)
        versions = client.search_model_versions("name = 'churn'")
        registry = Registry(tracking, AuditLog(db))
        if code == 0:
            assert result and result["completed"], text[-4000:]
            assert [str(v.version) for v in versions] == [result["version"]], versions
        else:
            # a clear error naming the database, and nothing registered
            assert f"127.0.0.1:{cluster.port}" in text or "PostgreSQL" in text or "database" in text, text[-4000:]
        # whatever is registered is whole: digests verify, a status tag, its alias and the audit row of the move
        for mv in versions:
            loaded = registry.load("churn", version=str(mv.version))
            assert loaded.digests, mv
            status = (mv.tags or {}).get(TAG_STATUS)
            assert status in ("champion", "rejected"), mv.tags
            moves = [e for e in AuditLog(db).entries("churn") if e.to_version == str(mv.version)]
            if status == "champion":
                assert registry.alias_version("churn", "champion") == str(mv.version)
                assert [e.alias for e in moves] == ["champion"], moves
        assert LOCKED not in text
    finally:
        redis.stop()
        cluster.cleanup()


def test_eight_concurrent_trainings_on_sqlite(prefect_api: str, tmp_path: Path) -> None:
    """The local profile's stores (MLflow, project tables and Feast online on SQLite files), eight trainings at
    once against one Prefect server: what SQLite's single writer does under them."""
    from mlflow import MlflowClient

    from flywheel.audit import AuditLog
    from flywheel.runtime import start_run_context

    home = _home(tmp_path / "home")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "FLYWHEEL_", "MLFLOW_"))}
    env.update({"PYTHONPATH": str(PROJECT), "PREFECT_API_URL": prefect_api, "FLYWHEEL_STORES__PREFECT_API_URL":
                prefect_api, "FLYWHEEL_TRAIN__SEARCH__TRIALS": "1", "MLFLOW_DISABLE_TELEMETRY": "true",
                "FLYWHEEL_EVALUATE__GATE_OVERRIDES": "{latency: {service_budget_ms: 2000}}", "OMP_NUM_THREADS": "1"})
    ctx = start_run_context("local", home / "configs")
    MlflowClient(ctx.tracking_uri).search_experiments()  # MLflow's migrations once, before the eight start
    started = time.monotonic()
    procs = [_start_training(home, env, i, "local") for i in range(RUNS)]
    codes = [_finish(p, started + RUN_BUDGET_S) for p, _ in procs]
    wall = time.monotonic() - started
    logs = {i: log.read_text() for i, (_, log) in enumerate(procs)}
    results = [_result(log) for _, log in procs]
    locked = [i for i, text in logs.items() if LOCKED in text]
    print(f"\n{RUNS} concurrent trainings on SQLite: {wall:.0f} s wall; exit codes {codes}; outcomes "
          f"{sorted((r or {}).get('outcome', 'failed') for r in results)}; 'database is locked' in runs {locked}")
    for i, code in enumerate(codes):
        assert code == 0, f"training {i} exited {code}:\n{logs[i][-4000:]}"
    assert not locked, {i: logs[i][-3000:] for i in locked}
    groups = _versions_by_digests(ctx.tracking_uri, "churn")
    assert len(groups) == 1 and all(len(v) == 1 for v in groups.values()), groups
    moves = [e for e in AuditLog(ctx.audit_db_url).entries("churn") if e.alias in ("champion", "challenger")]
    assert len(moves) <= 1, moves
