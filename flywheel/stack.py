"""The persistent local stack: `flywheel up` / `flywheel status` / `flywheel down`.

`up` starts these at once (the serve process waits for the server's API itself), each as its own
process group (session) with its log in `<pid_dir>/<name>.log`, and waits until each answers:

- `prefect`: `prefect server start` on SQLite under `stack.prefect_home` (skipped when
  `stores.prefect_api_url` points at a server of its own, as in the production profile);
- `deployments`: `python -m flows.serve_deployments`, which `serve()`s the deployments of
  deployments/prefect.yaml (training, batch scoring on `batch.cron`, rollout on its event trigger);
- `service`: the online prediction service (`python -m flywheel.service`);
- `webhook`: the webhook receiver (`python -m flywheel.webhook`), when its secret variable
  (`webhook.secret_env`) is set; without it `up` says so and starts the rest;
- `mlflow-ui`: `mlflow ui` on request (`stack.mlflow_ui` or `flywheel up --mlflow-ui`).

Each started process is recorded in `<pid_dir>/<name>.pid` (JSON: pid, its start time, command, URL).
`down` signals only the process groups of records whose pid still belongs to the process we started
(same pid AND same start time), so a recycled pid is never killed; records of dead processes are
removed with a message. `<pid_dir>/prefect.url` holds the API URL while the stack runs:
`active_api_url(settings)` reads it so that `flywheel train` and the demo use the running server.
The service's admin token comes from `serve.admin_token_env`, else one generated per stack
(`<pid_dir>/admin.token`, mode 0600) is given to both the service and the served rollout flows.
One clock for the stack: `up` fixes the settings' clock once (a simulated clock without an anchor is
anchored at that moment), writes it to `<pid_dir>/clock.json` and gives every child its FLYWHEEL_CLOCK__*
variables; entry points on the running stack (`use_active_stack`) export the same, so the CLI, the demo,
the served flows, the service and the webhook all tell the same simulated time.
No Prefect import here: this module runs in the CLI before any flow.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import httpx
import psutil

from flywheel.clock import (
    Clock,
    ClockConfig,
    SimulatedClockConfig,
    WallClockConfig,
    anchored,
    build_clock,
    clock_env,
    same_clock,
)
from flywheel.errors import StackError
from flywheel.settings import Settings

PROJECT_ROOT = Path(__file__).resolve().parents[1]  # the code checkout: flows/ and deployments/ live here
ORDER = ("prefect", "deployments", "service", "webhook", "mlflow-ui")  # start order; `down` stops in reverse
URL_FILE = "prefect.url"
READY_FILE = "deployments.ready.json"  # written by flows/serve_deployments.py once its deployments exist
TOKEN_FILE = "admin.token"  # the stack's service admin token when the environment does not provide one
CLOCK_FILE = "clock.json"  # the stack's clock, anchored once by `up`: every process of the stack reads it
# in stack.prefect_home: the Prefect version whose migrations the server there last ran to the end (written by
# `up` once that server answered); a warm start of the same version skips Alembic's walk over ~200 revisions
MIGRATED_FILE = "flywheel-migrated.json"
Echo = Callable[[str], None]


@dataclass(frozen=True)
class ProcessSpec:
    """One process of the stack and how to tell that it is up."""

    name: str
    argv: list[str]
    env: dict[str, str]
    cwd: Path
    url: str | None = None  # what `up` prints
    health_url: str | None = None
    # "ok": health_url answers 200; "http": it answers at all (the service says 503 until a model exists);
    # "ready-file": serve_deployments wrote READY_FILE with this pid
    wait: Literal["ok", "http", "ready-file"] = "ok"


@dataclass(frozen=True)
class PidRecord:
    name: str
    pid: int
    create_time: float  # psutil's process start time: pid + start time identify our process
    argv: list[str]
    url: str | None = None
    health_url: str | None = None
    wait: str = "ok"
    log: str | None = None
    started_at: float = field(default_factory=time.time)


@dataclass(frozen=True)
class ProcessStatus:
    name: str
    pid: int | None
    running: bool
    healthy: bool | None  # None: not running, or nothing to ask
    url: str | None
    detail: str = ""


# ------------------------------------------------------------------------------------------ pid files


def pid_dir(settings: Settings) -> Path:
    return settings.resolve(settings.stack.pid_dir)


def pid_file(directory: Path, name: str) -> Path:
    return directory / f"{name}.pid"


def write_record(directory: Path, record: PidRecord) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = pid_file(directory, record.name)
    tmp = path.with_suffix(".pid.tmp")
    tmp.write_text(json.dumps(asdict(record), indent=1))
    tmp.replace(path)  # atomic: a reader never sees half a record
    return path


def read_record(directory: Path, name: str) -> PidRecord | None:
    """The record of `name`, or None when there is none. A malformed file raises StackError naming it."""
    path = pid_file(directory, name)
    if not path.is_file():
        return None
    try:
        return PidRecord(**json.loads(path.read_text()))
    except (ValueError, TypeError) as exc:
        raise StackError(f"{path}: not a Flywheel pid file ({exc}); remove it if no stack process runs") from None


def records(directory: Path) -> list[PidRecord]:
    """Every record in `directory`, in start order (unknown names last)."""
    names = [p.stem for p in sorted(directory.glob("*.pid"))] if directory.is_dir() else []
    names.sort(key=lambda n: ORDER.index(n) if n in ORDER else len(ORDER))
    return [r for r in (read_record(directory, n) for n in names) if r is not None]


def _process(record: PidRecord) -> psutil.Process | None:
    """The live process `record` describes, or None when it is gone or the pid now belongs to another."""
    try:
        proc = psutil.Process(record.pid)
        if abs(proc.create_time() - record.create_time) > 0.05 or proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return proc
    except psutil.Error:
        return None


def is_running(record: PidRecord) -> bool:
    return _process(record) is not None


# ------------------------------------------------------------------------------------------ start


def _port_answers(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def start_process(spec: ProcessSpec, directory: Path) -> PidRecord:
    """Start `spec` in a session of its own (its pid is its process group id) and record it."""
    directory.mkdir(parents=True, exist_ok=True)
    log = directory / f"{spec.name}.log"
    with log.open("ab") as out:
        out.write(f"\n---- {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(spec.argv)}\n".encode())
        out.flush()
        try:
            proc = subprocess.Popen(spec.argv, cwd=spec.cwd, env=spec.env, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        except OSError as exc:
            raise StackError(f"could not start {spec.name} ({spec.argv[0]}): {exc}") from None
    try:
        created = psutil.Process(proc.pid).create_time()
    except psutil.Error:  # exited at once: record it anyway, the health wait reports the log
        created = 0.0
    record = PidRecord(name=spec.name, pid=proc.pid, create_time=created, argv=spec.argv, url=spec.url,
                       health_url=spec.health_url, wait=spec.wait, log=str(log))
    write_record(directory, record)
    return record


def _log_tail(record: PidRecord, lines: int = 25) -> str:
    if not record.log or not Path(record.log).is_file():
        return "(no log)"
    text = Path(record.log).read_text(errors="replace").splitlines()
    return "\n".join(text[-lines:])


def check_health(record: PidRecord, directory: Path, timeout: float = 2.0) -> tuple[bool, str]:
    """(healthy, detail) of a running record, by its wait rule."""
    if record.wait == "ready-file":
        ready = directory / READY_FILE
        try:
            info = json.loads(ready.read_text())
        except (OSError, ValueError):
            return False, "registering deployments"
        if info.get("pid") != record.pid:
            return False, "registering deployments"
        return True, "serving " + ", ".join(info.get("deployments", []))
    if not record.health_url:
        return True, ""
    try:
        resp = httpx.get(record.health_url, timeout=timeout)
    except httpx.HTTPError as exc:
        return False, f"no answer from {record.health_url} ({type(exc).__name__})"
    if record.wait == "http":
        return resp.status_code == 200, f"HTTP {resp.status_code}" + (
            " (up; no model loaded yet)" if resp.status_code == 503 else "")
    return resp.status_code == 200, f"HTTP {resp.status_code}"


def _is_up(record: PidRecord, directory: Path) -> bool:
    """Good enough to go on: healthy, or for "http" (the service), answering at all."""
    healthy, detail = check_health(record, directory)
    return healthy or (record.wait == "http" and detail.startswith("HTTP"))


def wait_until_up(records_: list[PidRecord], directory: Path, timeout: float) -> dict[str, float]:
    """Wait for every record to be up; seconds each took. Raises StackError (with the log) if one dies or
    times out."""
    pending = {r.name: r for r in records_}
    took: dict[str, float] = {}
    start = time.monotonic()
    while pending:
        for name, record in list(pending.items()):
            if not is_running(record):
                raise StackError(f"{name} exited during start-up; last lines of {record.log}:\n{_log_tail(record)}")
            if _is_up(record, directory):
                took[name] = time.monotonic() - start
                del pending[name]
        if not pending:
            break
        if time.monotonic() - start > timeout:
            names = ", ".join(pending)
            tails = "\n".join(f"--- {r.log}:\n{_log_tail(r)}" for r in pending.values())
            raise StackError(f"{names} not up after {timeout:.0f} s (stack.start_timeout_seconds)\n{tails}")
        time.sleep(0.25)
    return took


# ------------------------------------------------------------------------------------------ the clock


def read_clock(directory: Path) -> WallClockConfig | SimulatedClockConfig | None:
    """The clock `up` recorded for the stack in `directory`, or None. A malformed file raises StackError."""
    from pydantic import TypeAdapter, ValidationError

    path = directory / CLOCK_FILE
    if not path.is_file():
        return None
    try:
        return TypeAdapter(ClockConfig).validate_json(path.read_text())
    except ValidationError as exc:
        raise StackError(f"{path}: not a Flywheel clock record ({exc.errors()[0]['msg']}); "
                         "remove it if no stack process runs") from None


def settle_clock(directory: Path, wanted: WallClockConfig | SimulatedClockConfig, running: bool,
                 ) -> WallClockConfig | SimulatedClockConfig:
    """The clock the stack in `directory` runs on. A stack with live processes keeps its recorded clock, and
    settings asking for another fail (its processes would tell another time); otherwise `wanted`, anchored
    now, is recorded for the processes about to start."""
    recorded = read_clock(directory)
    if running and recorded is not None:
        if not same_clock(recorded, wanted):
            raise StackError(f"the running stack's clock is {_clock_text(recorded)}, these settings ask for "
                             f"{_clock_text(wanted)}: stop it first (`flywheel down`), then `flywheel up` again")
        return recorded
    clock = anchored(wanted)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f"{CLOCK_FILE}.tmp"
    tmp.write_text(clock.model_dump_json(indent=1))
    tmp.replace(directory / CLOCK_FILE)  # atomic: a reader never sees half a record
    return clock


def _clock_text(cfg: WallClockConfig | SimulatedClockConfig) -> str:
    if isinstance(cfg, SimulatedClockConfig):
        start = cfg.start.isoformat() if cfg.start else "its anchor"
        return f"simulated (1 day per {cfg.seconds_per_day:g} s from {start})"
    return "wall"


def active_clock(settings: Settings) -> WallClockConfig | SimulatedClockConfig:
    """The clock of the running stack (as `up` recorded it) while any of its processes lives, else the
    settings' own. Not tied to the API URL: PREFECT_API_URL set (by `use_active_stack` too) changes which
    server a process talks to, not the time the stack's service and flows tell."""
    directory = pid_dir(settings)
    try:
        recorded = read_clock(directory)
        live = recorded is not None and any(is_running(r) for r in records(directory))
    except StackError:
        return settings.clock
    return recorded if live and recorded is not None else settings.clock


def project_clock(settings: Settings) -> Clock:
    """The clock the project's logic runs on in this process: the running stack's, else the settings'."""
    return build_clock(active_clock(settings))


# ------------------------------------------------------------------------------------------ the plan


def api_url(settings: Settings) -> str:
    """The Prefect API the stack uses: `stores.prefect_api_url`, else the local server of `up`."""
    return settings.stores.prefect_api_url or f"http://{settings.stack.host}:{settings.stack.prefect_port}/api"


def _base_env(settings: Settings, webhook: bool = False) -> dict[str, str]:
    env = dict(os.environ)
    if not webhook:  # least privilege: only the receiver holds the webhook secrets
        for name in (settings.webhook.secret_env, settings.webhook.previous_secret_env):
            env.pop(name, None)
    # telemetry off unless the settings asked for it (apply_runtime_environment set these in os.environ)
    env.setdefault("DO_NOT_TRACK", "1")
    env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # the code checkout first on the path: flows/ and tasks/ import as packages from any project home
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PROJECT_ROOT), env.get("PYTHONPATH", "")) if p)
    recorded = read_clock(pid_dir(settings))
    if recorded is not None:  # one simulated time for every process of the stack (written by `up` first)
        env.update(clock_env(recorded))
    return env


def admin_token_env(settings: Settings) -> dict[str, str]:
    """The service's admin token for the service AND the deployments process (rollout flows call the
    service's admin endpoints). From the environment variable `serve.admin_token_env` when set; else one
    generated for this stack, kept in `<pid_dir>/admin.token` (mode 0600, removed by `down`) so that a
    process restarted by a later `up` gets the same one."""
    name = settings.serve.admin_token_env
    if os.environ.get(name):
        return {}  # inherited by every child
    path = pid_dir(settings) / TOKEN_FILE
    if not path.is_file():
        import secrets

        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32))
    return {name: path.read_text().strip()}


def plan(settings: Settings, profile: str | None, config_dir: Path | str | None,
         mlflow_ui: bool | None = None) -> list[ProcessSpec]:
    """The processes `up` starts for these settings, in start order."""
    st = settings.stack
    data = pid_dir(settings)
    prefect_home = settings.resolve(st.prefect_home)
    url = api_url(settings)
    # child processes load the same settings: same profile and config folder (absolute: cwd differs)
    cfg = Path(config_dir).resolve() if config_dir else (settings.paths.home / "configs").resolve()
    sel = ["--config-dir", str(cfg), "--profile", profile or settings.profile]
    py = sys.executable
    specs: list[ProcessSpec] = []

    if not settings.stores.prefect_api_url:
        env = _base_env(settings)
        env.pop("PREFECT_API_URL", None)  # the server itself must not point at another server
        env.update({
            "PREFECT_HOME": str(prefect_home),
            "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{prefect_home / 'prefect.db'}",
            # without it the UI of any port but 4200 calls 127.0.0.1:4200 ("Can't connect to Server API")
            "PREFECT_UI_API_URL": url,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        })
        if schema_current(prefect_home):  # a variable set by the user still wins
            env.setdefault("PREFECT_API_DATABASE_MIGRATE_ON_START", "false")
        specs.append(ProcessSpec(
            name="prefect",
            argv=[py, "-m", "prefect", "server", "start", "--host", st.host, "--port", str(st.prefect_port)],
            env=env, cwd=settings.paths.home, url=url.removesuffix("/api"), health_url=f"{url}/health", wait="ok",
        ))

    token = admin_token_env(settings)
    env = _base_env(settings)
    env.update({"PREFECT_API_URL": url, "PREFECT_HOME": str(prefect_home), **token})
    specs.append(ProcessSpec(
        name="deployments",
        argv=[py, "-m", "flows.serve_deployments", *sel, "--ready-file", str(data / READY_FILE)],
        env=env, cwd=PROJECT_ROOT, url=None, wait="ready-file",
    ))

    sv = settings.serve
    service_url = f"http://{sv.host}:{sv.port}"
    specs.append(ProcessSpec(
        name="service",
        argv=[py, "-m", "flywheel.service", *sel, "--host", sv.host, "--port", str(sv.port)],
        env={**_base_env(settings), **token}, cwd=PROJECT_ROOT, url=service_url, health_url=f"{service_url}/health",
        wait="http",
    ))

    wh = settings.webhook
    if os.environ.get(wh.secret_env) or _recorded_alive(data, "webhook"):
        hook_url = f"http://{wh.host}:{wh.port}"
        specs.append(ProcessSpec(
            name="webhook",
            argv=[py, "-m", "flywheel.webhook", *sel, "--host", wh.host, "--port", str(wh.port)],
            env={**_base_env(settings, webhook=True), "PREFECT_API_URL": url}, cwd=PROJECT_ROOT, url=hook_url,
            health_url=f"{hook_url}/health", wait="ok",  # 200 once its table and the Prefect API answer
        ))

    if mlflow_ui is None:  # the setting, or keep one a previous `up --mlflow-ui` started
        mlflow_ui = st.mlflow_ui or _recorded_alive(data, "mlflow-ui")
    if mlflow_ui:
        specs.append(ProcessSpec(name="mlflow-ui", argv=mlflow_ui_command(settings), env=_base_env(settings),
                                 cwd=settings.paths.home, url=f"http://{st.host}:{st.mlflow_ui_port}",
                                 health_url=f"http://{st.host}:{st.mlflow_ui_port}/health", wait="ok"))
    return specs


def _prefect_version() -> str:
    from importlib.metadata import version

    return version("prefect")  # the installed distribution's metadata: no Prefect import


def schema_current(prefect_home: Path) -> bool:
    """True when the local server's SQLite database exists and its schema was brought to the head of the
    installed Prefect's migrations by an earlier `up` (MIGRATED_FILE); an upgraded Prefect migrates again."""
    marker = prefect_home / MIGRATED_FILE
    if not (prefect_home / "prefect.db").is_file() or not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()).get("prefect") == _prefect_version()
    except (OSError, ValueError, AttributeError):
        return False


def mark_schema_current(prefect_home: Path) -> None:
    """Record that the server on this home answered: its start-up migrations ran to the end."""
    tmp = prefect_home / f"{MIGRATED_FILE}.tmp"
    tmp.write_text(json.dumps({"prefect": _prefect_version()}))
    tmp.replace(prefect_home / MIGRATED_FILE)


def _recorded_alive(directory: Path, name: str) -> bool:
    try:
        record = read_record(directory, name)
    except StackError:
        return False
    return record is not None and is_running(record)


def mlflow_ui_command(settings: Settings) -> list[str]:
    # one worker: with its default four, uvicorn's supervisor kills each worker that misses its 5 s health
    # check while still importing MLflow, so on a busy 2-core machine the UI never came up (seen here)
    return [str(Path(sys.executable).with_name("mlflow")), "ui",
            "--backend-store-uri", settings.mlflow_tracking_uri,
            "--default-artifact-root", settings.mlflow_artifact_location,
            "--host", settings.stack.host, "--port", str(settings.stack.mlflow_ui_port), "--workers", "1"]


# ------------------------------------------------------------------------------------------ up / down


@dataclass
class UpReport:
    started: list[str] = field(default_factory=list)
    already: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    urls: dict[str, str] = field(default_factory=dict)


def up(settings: Settings, profile: str | None = None, config_dir: Path | str | None = None, *,
       mlflow_ui: bool | None = None, echo: Echo = print) -> UpReport:
    """Start whatever of the stack is not running; wait until each answers. Idempotent.

    On a failure, the processes this call started are stopped again and StackError says why."""
    directory = pid_dir(settings)
    directory.mkdir(parents=True, exist_ok=True)
    report = UpReport()
    started: list[PidRecord] = []
    live = any(is_running(r) for r in records(directory))
    settle_clock(directory, settings.clock, live)  # before the plan: every child gets its variables
    specs = plan(settings, profile, config_dir, mlflow_ui)
    if "webhook" not in {s.name for s in specs}:
        echo(f"webhook: not started: set {settings.webhook.secret_env} (the secret senders sign with, at least 16 "
             "characters) and run `flywheel up` again")
    try:
        t0 = time.monotonic()
        for spec in specs:
            record, new = start_or_reuse(spec, directory, echo)
            if new:
                started.append(record)
                report.started.append(spec.name)
            else:
                report.already.append(spec.name)
            if spec.url:
                report.urls[spec.name] = spec.url
        # all started at once (the serve process imports its flows while the server starts, then waits for
        # its API); the server first: the others' failures are often only a consequence of it
        server = [r for r in started if r.name == "prefect"]
        report.seconds.update(wait_until_up(server, directory, settings.stack.start_timeout_seconds))
        if server:  # it answers /health only after its lifespan ran the migrations
            mark_schema_current(settings.resolve(settings.stack.prefect_home))
        if settings.stores.prefect_api_url:  # an external server: it must answer before anything uses it
            _wait_external(api_url(settings), settings.stack.start_timeout_seconds)
        (directory / URL_FILE).write_text(api_url(settings) + "\n")
        rest = [r for r in started if r.name != "prefect"]
        took = wait_until_up(rest, directory, settings.stack.start_timeout_seconds)
        offset = report.seconds.get("prefect", 0.0)
        report.seconds.update({k: v + offset for k, v in took.items()})
        report.seconds["total"] = time.monotonic() - t0
    except BaseException:
        for record in reversed(started):
            _stop(record, directory, settings.stack.stop_timeout_seconds, echo)
        if "prefect" in {r.name for r in started}:
            (directory / URL_FILE).unlink(missing_ok=True)
        raise
    report.urls["api"] = api_url(settings)
    return report


def start_or_reuse(spec: ProcessSpec, directory: Path, echo: Echo = print) -> tuple[PidRecord, bool]:
    """(record, started now): the live recorded process of `spec.name`, else a new one (a stale pid file
    is removed with a message first)."""
    record = read_record(directory, spec.name)
    if record and is_running(record):
        echo(f"{spec.name}: already running (pid {record.pid})")
        return record, False
    if record:
        echo(f"{spec.name}: stale pid file (pid {record.pid} is gone): removed")
        pid_file(directory, spec.name).unlink(missing_ok=True)
    _check_port_free(spec)
    if spec.wait == "ready-file":
        (directory / READY_FILE).unlink(missing_ok=True)
    record = start_process(spec, directory)
    echo(f"{spec.name}: started (pid {record.pid}, log {record.log})")
    return record, True


def _check_port_free(spec: ProcessSpec) -> None:
    if spec.health_url is None:
        return
    hostport = httpx.URL(spec.health_url)
    if hostport.port and _port_answers(hostport.host, hostport.port):
        raise StackError(f"cannot start {spec.name}: something else already listens on {hostport.host}:"
                         f"{hostport.port} (not started by this stack: no live pid file). Stop it, or choose "
                         "another port in the settings (stack.*_port, serve.port, webhook.port)")


def _wait_external(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        if time.monotonic() > deadline:
            raise StackError(f"the Prefect API at {url} (stores.prefect_api_url) does not answer /health")
        time.sleep(0.5)


def _group_members(pgid: int, not_before: float) -> list[psutil.Process]:
    """Live processes of group `pgid` started no earlier than our leader (a reused pgid is not ours)."""
    out = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if (os.getpgid(proc.pid) == pgid and proc.create_time() >= not_before - 0.05
                    and proc.status() != psutil.STATUS_ZOMBIE):
                out.append(proc)
        except (psutil.Error, ProcessLookupError, PermissionError):
            continue
    return out


def _signal_group(members: list[psutil.Process], sig: signal.Signals) -> None:
    for proc in members:
        with contextlib.suppress(psutil.Error):
            proc.send_signal(sig)


def _stop(record: PidRecord, directory: Path, timeout: float, echo: Echo) -> str:
    """Stop one recorded process group; remove its pid file. Returns what happened."""
    path = pid_file(directory, record.name)
    leader = _process(record)
    if leader is None:
        # the leader is gone; members of its group that it started (e.g. the server's uvicorn) may live on
        pid_taken = psutil.pid_exists(record.pid)
        orphans = [] if pid_taken or not record.create_time else _group_members(record.pid, record.create_time)
        _terminate(orphans, timeout)
        path.unlink(missing_ok=True)
        msg = f"{record.name}: stale pid file (pid {record.pid} is gone): removed"
        if orphans:
            msg += f"; stopped {len(orphans)} leftover process(es) of its group"
        echo(msg)
        return "stale"
    members = _group_members(record.pid, record.create_time) if _leads_group(leader) else [leader]
    _terminate(members, timeout)
    path.unlink(missing_ok=True)
    echo(f"{record.name}: stopped (pid {record.pid})")
    return "stopped"


def _leads_group(proc: psutil.Process) -> bool:
    try:
        return os.getpgid(proc.pid) == proc.pid
    except (ProcessLookupError, PermissionError):
        return False


def _terminate(members: list[psutil.Process], timeout: float) -> None:
    if not members:
        return
    _signal_group(members, signal.SIGTERM)
    _, alive = psutil.wait_procs(members, timeout=timeout)
    alive = [p for p in alive if _still_alive(p)]
    if alive:
        _signal_group(alive, signal.SIGKILL)
        psutil.wait_procs(alive, timeout=5)


def _still_alive(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def down(settings: Settings, echo: Echo = print) -> list[str]:
    """Stop every process `up` recorded (reverse start order), by process group; remove the pid files.

    Processes that no pid file names are never touched. Returns the names stopped (not the stale ones)."""
    directory = pid_dir(settings)
    stopped = []
    recs = records(directory)
    if not recs:
        echo(f"nothing to stop: no pid files in {directory}")
    for record in reversed(recs):
        if _stop(record, directory, settings.stack.stop_timeout_seconds, echo) == "stopped":
            stopped.append(record.name)
    if not records(directory):  # everything stopped: nothing holds the token any more
        for name in (URL_FILE, READY_FILE, TOKEN_FILE, CLOCK_FILE):
            (directory / name).unlink(missing_ok=True)
    return stopped


def status(settings: Settings) -> list[ProcessStatus]:
    """What the pid files say and whether each process is alive and healthy."""
    directory = pid_dir(settings)
    out = []
    for record in records(directory):
        if not is_running(record):
            out.append(ProcessStatus(record.name, record.pid, False, None, record.url,
                                     "stale pid file: process gone (`flywheel down` cleans it)"))
            continue
        healthy, detail = check_health(record, directory)
        out.append(ProcessStatus(record.name, record.pid, True, healthy, record.url, detail))
    return out


def active_api_url(settings: Settings, environ: dict[str, str] | None = None) -> str | None:
    """The API URL of a running `flywheel up` stack, for entry points to use when nothing else is set.

    None when PREFECT_API_URL or `stores.prefect_api_url` is set (explicit wins), or when no stack runs
    (no `<pid_dir>/prefect.url`, or its server process is gone)."""
    env = os.environ if environ is None else environ
    if env.get("PREFECT_API_URL") or settings.stores.prefect_api_url:
        return None
    directory = pid_dir(settings)
    url_file = directory / URL_FILE
    if not url_file.is_file():
        return None
    try:
        record = read_record(directory, "prefect")
    except StackError:
        return None
    if record is None or not is_running(record):
        return None
    return url_file.read_text().strip() or None


def use_active_stack(settings: Settings) -> str | None:
    """Point this process at the running stack (sets PREFECT_API_URL, and FLYWHEEL_CLOCK__* when the stack
    runs on a simulated clock) if `active_api_url` finds one.

    Call before Prefect is imported: Prefect reads its settings from the environment at import."""
    url = active_api_url(settings)
    if url:
        os.environ["PREFECT_API_URL"] = url
        # and its clock: settings loaded in this process from now on (flows run in it) tell the stack's time
        os.environ.update(clock_env(active_clock(settings)))
    return url
