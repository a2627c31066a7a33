"""Deployments on a work pool, run by a real `prefect worker` process (module: one Prefect server, one deploy).

- `flywheel deploy` against a real server creates the process pool (with the heartbeat in its job env), registers
  every deployment of deployments/prefect.yaml (pull step, trigger, concurrency limit) and the crash automation;
- `prefect deployment run training-pipeline/training --param ...` from the CLI, picked up by `prefect worker start
  --pool flywheel-process` on a tiny generated home; the worker and the flow run's process group SIGKILLed while
  the run trains: the server's crash detection (the automation `flywheel deploy` made; heartbeats every 30 s
  here) ends the run Crashed; the next run, through a new worker, completes and registers exactly one version
  (churn v1, champion), with every batch ingested once and no temp file left behind.
Every process is started in its own session and stopped by pid.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import psutil
import pytest

from tests.benchmarks.bench_training import start_prefect_server, stop
from tests.conftest import PROJECT, make_home

pytestmark = [pytest.mark.integration, pytest.mark.slow]
BIN = Path(sys.executable).parent
TRAINING = "training-pipeline/training"
HEARTBEAT_S, CRASHED_AFTER_S = 30, 60  # Prefect's minimum heartbeat; the automation's silence before Crashed
# budget for crash detection: the last heartbeat was at most HEARTBEAT_S before the kill, then CRASHED_AFTER_S
# of silence, then the triggers service's proactive pass (every few seconds); doubled for a loaded machine
CRASH_BUDGET_S = 2 * (HEARTBEAT_S + CRASHED_AFTER_S) + 60
RUN_BUDGET_S = 900  # a training run on a busy 2-core machine (module imports in a fresh process dominate)
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def _env(api: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "FLYWHEEL_"))}
    return {**env, "PREFECT_API_URL": api, **extra}


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    proc, url, _ = start_prefect_server(tmp_path_factory.mktemp("prefect-server"))
    try:
        yield url
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def deployed(api: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """`flywheel deploy` run once, as a user would, with a fast heartbeat and crash detection."""
    home = make_home(tmp_path_factory.mktemp("deploy-home"))
    done = subprocess.run(
        [str(BIN / "flywheel"), "deploy", "--profile", "ci", "--config-dir", str(home / "configs")],
        env=_env(api, FLYWHEEL_DEPLOY__HEARTBEAT_SECONDS=str(HEARTBEAT_S),
                 FLYWHEEL_DEPLOY__CRASHED_AFTER_SECONDS=str(CRASHED_AFTER_S)),
        cwd=home, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "training-pipeline/training" in done.stderr, done.stderr
    with client_of(api) as client:  # cron runs (monitoring hourly, ...) would reach the test's workers: off
        for dep in client.read_deployments():
            for sched in dep.schedules:
                client.update_deployment_schedule(dep.id, sched.id, active=False)
    return api


def _home(tmp_path: Path, days: int = 14) -> Path:
    from flywheel.datagen import GeneratorSpec, write_batches

    home = make_home(tmp_path)
    write_batches(GeneratorSpec(seed=5, days=days, rows_per_day=250, customers=1500),
                  home / "data" / "incoming" / "churn")
    return home


@contextmanager
def worker(api: str, home: Path) -> Iterator[subprocess.Popen[bytes]]:
    """`prefect worker start --pool flywheel-process` for `home` (the env a worker machine sets), in its own
    session; on exit it and every process it started are killed by pid."""
    env = _env(api, FLYWHEEL_HOME=str(PROJECT), FLYWHEEL_PROFILE="ci", FLYWHEEL_CONFIG_DIR=str(home / "configs"))
    log = (home / "worker.log").open("ab")
    proc = subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", "flywheel-process"],
                            env=env, cwd=home, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield proc
    finally:
        kill_tree(proc.pid)
        with suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=30)
        log.close()


def kill_tree(pid: int) -> None:
    """SIGKILL `pid` and every descendant, each in its own process group (the worker starts each flow run
    in a new session, so killing the worker's group alone leaves the run going)."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        with suppress(ProcessLookupError, PermissionError):
            os.killpg(os.getpgid(p.pid), signal.SIGKILL)
        with suppress(psutil.NoSuchProcess):
            p.kill()


def run_from_cli(api: str, home: Path, reason: str) -> uuid.UUID:
    """`prefect deployment run training-pipeline/training --param params=...`, as a user types it."""
    done = subprocess.run([str(BIN / "prefect"), "deployment", "run", TRAINING,
                           "--param", f"params={json.dumps({'reason': reason})}"],
                          env=_env(api), cwd=home, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return uuid.UUID(re.search(r"UUID: ([0-9a-f-]{36})", done.stdout).group(1))


@contextmanager
def client_of(api: str) -> Iterator:
    """A sync Prefect client of the server at `api` (Prefect reads its settings once: the environment is too late)."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        yield client


def _flow_run(api: str, run_id: uuid.UUID):
    with client_of(api) as client:
        return client.read_flow_run(run_id)


def wait_final(api: str, run_id: uuid.UUID, budget_s: float, worker_proc: subprocess.Popen | None = None):
    deadline = time.monotonic() + budget_s
    while True:
        run = _flow_run(api, run_id)
        if run.state_type.value in TERMINAL:
            return run
        assert worker_proc is None or worker_proc.poll() is None, "the worker died"
        assert time.monotonic() < deadline, f"run still {run.state_name} after {budget_s} s"
        time.sleep(2)


def wait_training_task(api: str, run_id: uuid.UUID, budget_s: float) -> None:
    """Until the run's `train-*` task run is Running."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    deadline = time.monotonic() + budget_s
    while True:
        with client_of(api) as client:
            tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))
        if any(t.name.startswith("train-") and t.state_type.value == "RUNNING" for t in tasks):
            return
        run = _flow_run(api, run_id)
        assert run.state_type.value not in TERMINAL, f"run ended {run.state_name} before training"
        assert time.monotonic() < deadline, f"no training task running after {budget_s} s"
        time.sleep(0.5)


def versions(home: Path, model: str = "churn") -> list[str]:
    from mlflow import MlflowClient

    uri = f"sqlite:///{home}/data/mlflow.db"  # the registry too: it defaults to the process-wide one
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    return sorted(str(v.version) for v in client.search_model_versions(f"name='{model}'"))


def champion(home: Path, model: str = "churn") -> str:
    from mlflow import MlflowClient

    uri = f"sqlite:///{home}/data/mlflow.db"
    return str(MlflowClient(tracking_uri=uri, registry_uri=uri).get_model_version_by_alias(model, "champion").version)


def test_flywheel_deploy_registers_the_pool_deployments_and_crash_detection(deployed: str) -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flywheel.deploy import CRASH_AUTOMATION, HEARTBEAT_VAR, ensure_crash_detection, ensure_work_pool
    from flywheel.settings import DeployConfig

    with client_of(deployed) as client:
        pool = client.read_work_pool("flywheel-process")
        training = client.read_deployment_by_name(TRAINING)
        names = {a.name for a in client.read_automations()}
        (crash,) = client.read_automations_by_name(CRASH_AUTOMATION)
    assert pool.type == "process"
    assert pool.base_job_template["variables"]["properties"]["env"]["default"] == {HEARTBEAT_VAR: str(HEARTBEAT_S)}
    assert training.work_pool_name == "flywheel-process"
    assert training.pull_steps == [{"prefect.deployments.steps.set_working_directory":
                                    {"directory": "{{ $FLYWHEEL_HOME }}"}}], "resolved on the worker, not here"
    assert training.concurrency_options.collision_strategy.value == "ENQUEUE"
    assert "train on flywheel.retrain.requested" in names, names
    assert crash.trigger.within.total_seconds() == CRASHED_AFTER_S

    # idempotent: a pool whose heartbeat differs is updated in place, then left alone; one crash automation
    with temporary_settings({PREFECT_API_URL: deployed}):
        assert ensure_work_pool("flywheel-process", 45) == "updated"
        assert ensure_work_pool("flywheel-process", HEARTBEAT_S) == "updated"
        assert ensure_work_pool("flywheel-process", HEARTBEAT_S) == "unchanged"
        ensure_crash_detection(DeployConfig(heartbeat_seconds=HEARTBEAT_S, crashed_after_seconds=CRASHED_AFTER_S))
    with client_of(deployed) as client:
        env = client.read_work_pool("flywheel-process").base_job_template["variables"]["properties"]["env"]
        assert len(client.read_automations_by_name(CRASH_AUTOMATION)) == 1
    assert env["default"] == {HEARTBEAT_VAR: str(HEARTBEAT_S)}


def test_a_worker_killed_while_training_leaves_a_crashed_run_and_the_rerun_registers_once(
        deployed: str, tmp_path: Path) -> None:
    """Both runs are started from the CLI and run by a worker process; the second one is the proof that the
    worker path trains and registers (one test, not two: each training run costs minutes on a busy machine)."""
    import pandas as pd

    from flywheel.featurestore import BATCH_COLUMN, FEATURES_FILE, LEDGER_FILE

    home = _home(tmp_path)
    with worker(deployed, home) as proc:
        killed = run_from_cli(deployed, home, "to be killed")
        wait_training_task(deployed, killed, RUN_BUDGET_S)
        kill_tree(proc.pid)  # the worker and the run's own session, mid-training
        killed_at = time.monotonic()
    run = wait_final(deployed, killed, CRASH_BUDGET_S)
    assert run.state_type.value == "CRASHED", run.state_name
    print(f"Crashed {time.monotonic() - killed_at:.0f} s after the kill "
          f"(heartbeat {HEARTBEAT_S} s, crashed after {CRASHED_AFTER_S} s of silence)")
    assert versions(home) == [], "a killed run registered nothing"

    with worker(deployed, home) as proc:
        again = run_from_cli(deployed, home, "after the crash")
        rerun = wait_final(deployed, again, RUN_BUDGET_S, proc)
    assert rerun.state_type.value == "COMPLETED", f"{rerun.state_name}: {rerun.state.message} (see {home}/worker.log)"
    assert rerun.parameters == {"params": {"reason": "after the crash"}}
    assert versions(home) == ["1"] and champion(home) == "1"

    offline = home / "data" / "offline" / "churn"
    # the ledger is append-only JSON lines; the newest record of a batch is its state
    ledger = {}
    for line in (offline / LEDGER_FILE).read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            ledger[record["batch"]] = {**ledger.get(record["batch"], {}), **record}
    per_batch = pd.read_parquet(offline / FEATURES_FILE, columns=[BATCH_COLUMN])[BATCH_COLUMN].value_counts()
    assert len(ledger) == 14 and set(per_batch.index) == set(ledger), "every batch ingested, by the first run"
    assert all(per_batch[b] == ledger[b]["feature_rows"] for b in ledger), "no batch ingested twice"
    leftovers = [p for p in (home / "data").rglob("*.tmp") if "prefect" not in p.parts]
    assert leftovers == [], f"half-written files: {leftovers}"
