"""flywheel/stack.py without a Prefect server: pid files, stale records, idempotent start, `down` killing
only what it started (by process group), the process plan, and the deployments file the stack serves."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from flywheel import stack
from flywheel.errors import StackError
from flywheel.settings import load_settings
from tests.conftest import PROJECT

SLEEPER = [sys.executable, "-c", "import time; time.sleep(120)"]


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _spec(name: str, argv: list[str], tmp: Path) -> stack.ProcessSpec:
    return stack.ProcessSpec(name=name, argv=argv, env=dict(os.environ), cwd=tmp)


def _wait_gone(pid: int, seconds: float = 10) -> bool:
    deadline = time.monotonic() + seconds
    while not _gone(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return _gone(pid)


@pytest.fixture
def run_dir(settings) -> Path:
    return stack.pid_dir(settings)


@pytest.fixture
def cleanup():
    """Processes a test started outside the stack: killed at teardown by pid."""
    procs: list[subprocess.Popen] = []
    yield procs
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait(5)


def test_record_roundtrip_and_malformed_file_is_named(run_dir: Path) -> None:
    rec = stack.PidRecord(name="service", pid=123, create_time=1.5, argv=["x"], url="http://127.0.0.1:1")
    path = stack.write_record(run_dir, rec)
    assert path == run_dir / "service.pid"
    assert stack.read_record(run_dir, "service") == rec
    assert stack.read_record(run_dir, "prefect") is None
    (run_dir / "prefect.pid").write_text("12345\n")  # not ours: e.g. someone else's pid file
    with pytest.raises(StackError, match=r"prefect\.pid: not a Flywheel pid file"):
        stack.read_record(run_dir, "prefect")


def test_dead_pid_is_stale_and_down_removes_it_with_a_message(settings, run_dir: Path) -> None:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    rec = stack.PidRecord(name="service", pid=int(done.stdout), create_time=time.time() - 5, argv=["x"])
    stack.write_record(run_dir, rec)
    assert not stack.is_running(rec)
    [row] = stack.status(settings)
    assert not row.running and "stale" in row.detail
    said: list[str] = []
    assert stack.down(settings, echo=said.append) == []
    assert any("service: stale pid file" in s and str(rec.pid) in s for s in said)
    assert not (run_dir / "service.pid").exists()


def test_recycled_pid_is_not_ours_and_is_never_signalled(settings, run_dir: Path) -> None:
    # the pid file names a live process (this test) that started at another time: a recycled pid
    me = psutil.Process()
    rec = stack.PidRecord(name="deployments", pid=me.pid, create_time=me.create_time() - 1000, argv=["x"])
    stack.write_record(run_dir, rec)
    assert not stack.is_running(rec)
    said: list[str] = []
    stack.down(settings, echo=said.append)  # would SIGTERM this very process if it trusted the pid alone
    assert "stale" in said[0]
    assert not (run_dir / "deployments.pid").exists()


def test_start_or_reuse_is_idempotent_and_restarts_after_a_crash(settings, run_dir: Path, tmp_path: Path) -> None:
    spec = _spec("service", SLEEPER, tmp_path)
    said: list[str] = []
    try:
        first, new = stack.start_or_reuse(spec, run_dir, said.append)
        assert new and stack.is_running(first)
        assert (run_dir / "service.log").is_file()
        again, new = stack.start_or_reuse(spec, run_dir, said.append)
        assert not new and again == first
        assert said[-1] == f"service: already running (pid {first.pid})"

        os.killpg(first.pid, signal.SIGKILL)  # crashed behind our back
        assert _wait_gone(first.pid)
        third, new = stack.start_or_reuse(spec, run_dir, said.append)
        assert new and third.pid != first.pid
        assert any("stale pid file" in s for s in said)
    finally:
        stack.down(settings, echo=said.append)


def test_down_stops_whole_groups_it_started_and_nothing_else(settings, run_dir: Path, tmp_path: Path,
                                                             cleanup: list) -> None:
    # a recorded process with a child in its group (like `prefect server start` and its uvicorn)
    parent = [sys.executable, "-c",
              "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; "
              "time.sleep(120)']); print('ready', flush=True); time.sleep(120)"]
    stranger = subprocess.Popen(SLEEPER, start_new_session=True)  # not started by the stack
    cleanup.append(stranger)
    rec, _ = stack.start_or_reuse(_spec("prefect", parent, tmp_path), run_dir, lambda _: None)
    other, _ = stack.start_or_reuse(_spec("service", SLEEPER, tmp_path), run_dir, lambda _: None)
    deadline = time.monotonic() + 20
    while "ready" not in (run_dir / "prefect.log").read_text().splitlines() and time.monotonic() < deadline:
        time.sleep(0.05)
    children = psutil.Process(rec.pid).children()
    assert len(children) == 1
    child = children[0].pid

    said: list[str] = []
    assert stack.down(settings, echo=said.append) == ["service", "prefect"]  # reverse start order
    assert said == [f"service: stopped (pid {other.pid})", f"prefect: stopped (pid {rec.pid})"]
    assert _gone(rec.pid) and _gone(other.pid) and _wait_gone(child)
    assert stranger.poll() is None, "down killed a process it did not start"
    assert not list(run_dir.glob("*.pid"))


def test_active_api_url_needs_a_live_server_record_and_yields_to_explicit_settings(
    settings, run_dir: Path, tmp_path: Path
) -> None:
    url = "http://127.0.0.1:4999/api"
    assert stack.active_api_url(settings, environ={}) is None  # no stack
    (run_dir / stack.URL_FILE).parent.mkdir(parents=True, exist_ok=True)
    (run_dir / stack.URL_FILE).write_text(url + "\n")
    assert stack.active_api_url(settings, environ={}) is None  # url file but no server record
    try:
        stack.start_or_reuse(_spec("prefect", SLEEPER, tmp_path), run_dir, lambda _: None)
        assert stack.active_api_url(settings, environ={}) == url
        assert stack.active_api_url(settings, environ={"PREFECT_API_URL": "http://other/api"}) is None
    finally:
        stack.down(settings, echo=lambda _: None)
    assert stack.active_api_url(settings, environ={}) is None  # down removed prefect.url


def test_plan_for_a_local_profile(home: Path) -> None:
    s = load_settings("ci", home / "configs", environ={},
                      overrides={"stack": {"prefect_port": 4321}, "serve": {"port": 8765}})
    specs = {p.name: p for p in stack.plan(s, "ci", home / "configs")}
    assert list(specs) == ["prefect", "deployments", "service"]  # no MLflow UI unless asked
    server = specs["prefect"]
    assert server.argv[-4:] == ["--host", "127.0.0.1", "--port", "4321"]
    assert server.env["PREFECT_UI_API_URL"] == "http://127.0.0.1:4321/api"  # any port but 4200 needs it
    assert server.env["PREFECT_HOME"] == str(home / "data" / "prefect")
    assert server.env["PREFECT_API_DATABASE_CONNECTION_URL"].endswith(f"{home}/data/prefect/prefect.db")
    assert server.env["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
    assert "PREFECT_API_URL" not in server.env
    assert specs["deployments"].env["PREFECT_API_URL"] == "http://127.0.0.1:4321/api"
    assert specs["deployments"].cwd == PROJECT  # served entrypoints are relative to the code checkout
    assert "--config-dir" in specs["service"].argv and str(home / "configs") in specs["service"].argv
    assert specs["service"].argv[-2:] == ["--port", "8765"]
    assert "mlflow-ui" in [p.name for p in stack.plan(s, "ci", home / "configs", mlflow_ui=True)]


def test_warm_start_skips_migrations_only_for_the_version_that_ran_them(home: Path) -> None:
    s = load_settings("ci", home / "configs", environ={})
    prefect_home = s.resolve(s.stack.prefect_home)

    def migrate_var() -> str | None:
        server = next(p for p in stack.plan(s, "ci", home / "configs") if p.name == "prefect")
        return server.env.get("PREFECT_API_DATABASE_MIGRATE_ON_START")

    assert migrate_var() is None  # cold: no database yet, the server migrates on start
    prefect_home.mkdir(parents=True)
    stack.mark_schema_current(prefect_home)
    assert migrate_var() is None  # a marker without the database it speaks of: migrate
    (prefect_home / "prefect.db").write_bytes(b"")
    assert migrate_var() == "false"  # warm, same Prefect: Alembic's walk skipped
    (prefect_home / stack.MIGRATED_FILE).write_text('{"prefect": "2.0.0"}')
    assert migrate_var() is None  # another Prefect version migrated it last: migrate again
    (prefect_home / stack.MIGRATED_FILE).write_text("not json")
    assert migrate_var() is None


def test_service_and_rollouts_share_one_admin_token(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FLYWHEEL_ADMIN_TOKEN", raising=False)
    s = load_settings("ci", home / "configs", environ={})
    specs = {p.name: p for p in stack.plan(s, "ci", home / "configs")}
    token = specs["service"].env["FLYWHEEL_ADMIN_TOKEN"]
    assert len(token) >= 32 and specs["deployments"].env["FLYWHEEL_ADMIN_TOKEN"] == token
    assert "FLYWHEEL_ADMIN_TOKEN" not in specs["prefect"].env
    token_file = home / "data" / "run" / stack.TOKEN_FILE
    assert token_file.stat().st_mode & 0o777 == 0o600
    again = {p.name: p for p in stack.plan(s, "ci", home / "configs")}  # a later `up` restarting one process
    assert again["service"].env["FLYWHEEL_ADMIN_TOKEN"] == token
    stack.down(s, echo=lambda _: None)
    assert not token_file.exists()

    monkeypatch.setenv("FLYWHEEL_ADMIN_TOKEN", "from-the-environment")  # the user's own: inherited, not written
    specs = {p.name: p for p in stack.plan(s, "ci", home / "configs")}
    assert specs["service"].env["FLYWHEEL_ADMIN_TOKEN"] == "from-the-environment"
    assert not token_file.exists()


def test_plan_with_an_external_prefect_server_starts_none(home: Path) -> None:
    s = load_settings("ci", home / "configs", environ={},
                      overrides={"stores": {"prefect_api_url": "http://127.0.0.1:4200/api"}})
    specs = stack.plan(s, "ci", home / "configs")
    assert [p.name for p in specs] == ["deployments", "service"]
    assert specs[0].env["PREFECT_API_URL"] == "http://127.0.0.1:4200/api"


def test_up_refuses_a_port_someone_else_holds(settings, run_dir: Path, tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        spec = stack.ProcessSpec(name="service", argv=SLEEPER, env=dict(os.environ), cwd=tmp_path,
                                 health_url=f"http://127.0.0.1:{port}/health", wait="http")
        with pytest.raises(StackError, match=f"already listens on 127.0.0.1:{port}"):
            stack.start_or_reuse(spec, run_dir, lambda _: None)
    assert not (run_dir / "service.pid").exists()


def test_a_process_dying_at_start_fails_with_its_log(settings, run_dir: Path, tmp_path: Path) -> None:
    argv = [sys.executable, "-c", "import sys; print('boom: bad config'); sys.exit(3)"]
    spec = stack.ProcessSpec(name="service", argv=argv, env=dict(os.environ), cwd=tmp_path,
                             health_url="http://127.0.0.1:9/health", wait="http")
    rec = stack.start_process(spec, run_dir)
    with pytest.raises(StackError, match=r"(?s)service exited during start-up.*boom: bad config"):
        stack.wait_until_up([rec], run_dir, timeout=30)
    stack.down(settings, echo=lambda _: None)


# --------------------------------------------------------------------------------- deployments/prefect.yaml


def _deployments() -> dict[str, dict]:
    spec = yaml.safe_load((PROJECT / "deployments" / "prefect.yaml").read_text())
    return {d["name"]: d for d in spec["deployments"]}


def test_prefect_yaml_declares_the_rollout_trigger_on_challenger_events() -> None:
    deps = _deployments()
    assert {"training", "batch-scoring", "rollout"} <= set(deps)
    for dep in deps.values():
        path, _, func = dep["entrypoint"].partition(":")
        assert (PROJECT / path).is_file(), path
        assert f"def {func}(" in (PROJECT / path).read_text()
    [trigger] = deps["rollout"]["triggers"]
    assert trigger["expect"] == ["flywheel.model.challenger-registered"]
    assert trigger["match"] == {"prefect.resource.id": "flywheel.model.*"}
    params = trigger["parameters"]["params"]
    # the templates read the labels tasks/register.py puts on the event's resource
    register = (PROJECT / "tasks" / "register.py").read_text()
    assert params["model_name"] == "{{ event.resource['flywheel.model'] }}" and '"flywheel.model": name' in register
    assert params["challenger_version"] == "{{ event.resource['flywheel.version'] }}"
    assert '"flywheel.version": str(version)' in register


@pytest.mark.slow
def test_served_deployments_carry_run_settings_cron_and_checked_trigger_params(home: Path) -> None:
    from prefect.events import DeploymentEventTrigger

    from flows.serve_deployments import build_deployments

    s = load_settings("ci", home / "configs", environ={}, overrides={"batch": {"cron": "15 4 * * *"}})
    built = {d.name: d for d in build_deployments(s, "ci", str(home / "configs"))}
    assert set(built) == {"training", "batch-scoring", "monitoring", "rollout", "ingest", "outcomes",
                          "materialization", "retention"}
    assert [(sch.schedule.cron, sch.active) for sch in built["retention"].schedules] == [(s.retention.cron, True)]
    run_settings = {"profile": "ci", "config_dir": str(home / "configs")}
    batch = built["batch-scoring"]
    assert [sch.schedule.cron for sch in batch.schedules] == ["15 4 * * *"]  # from settings, not the yaml
    assert batch.parameters["params"] == {"alias": "champion", "skew_check": True, **run_settings}
    assert not built["training"].schedules[0].active
    # the UI draws an inactive cron like an active one: the description says which is off
    assert "Inactive schedule: `0 3 * * 1` (UTC)" in built["training"].description
    assert "Inactive" not in built["monitoring"].description
    monitoring = built["monitoring"]  # configs/triggers.yaml owns its schedule
    assert [(sch.schedule.cron, sch.active) for sch in monitoring.schedules] == [("0 * * * *", True)]
    assert monitoring.parameters["params"] == run_settings
    [trigger] = built["rollout"].triggers
    assert isinstance(trigger, DeploymentEventTrigger)
    # named and described by the event it waits for (the UI otherwise shows "A custom trigger")
    assert trigger.name == "roll out on flywheel.model.challenger-registered"
    assert "flywheel.model.challenger-registered" in trigger.description
    # a trigger's parameters replace the deployment's `params`: the run settings must be in both
    assert trigger.parameters["params"] == {
        "model_name": "{{ event.resource['flywheel.model'] }}",
        "challenger_version": "{{ event.resource['flywheel.version'] }}",
        **run_settings,
    }


@pytest.mark.slow
def test_a_trigger_param_the_flow_does_not_take_fails_at_start(home: Path, tmp_path: Path) -> None:
    from flows.serve_deployments import build_deployments

    spec = yaml.safe_load((PROJECT / "deployments" / "prefect.yaml").read_text())
    [rollout] = [d for d in spec["deployments"] if d["name"] == "rollout"]
    rollout["triggers"][0]["parameters"]["params"]["version"] = "{{ event.resource['flywheel.version'] }}"
    (tmp_path / "deployments").mkdir()
    bad = tmp_path / "deployments" / "prefect.yaml"
    bad.write_text(yaml.safe_dump({"deployments": [rollout]}))
    (tmp_path / "flows").mkdir()
    (tmp_path / "flows" / "rollout.py").touch()  # passes the existence check; the module imports from the checkout
    s = load_settings("ci", home / "configs", environ={})
    with pytest.raises(ValueError, match=r"trigger 0: params \['version'\] are not fields of RolloutParams"):
        build_deployments(s, "ci", str(home / "configs"), bad)
