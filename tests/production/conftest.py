"""Per-run PostgreSQL databases and Redis for the production-profile tests (skipped, with the reason,
when a service is absent). Nothing here touches anything else on those servers."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

# the machine's PostgreSQL trusts 127.0.0.1 and ignores the password; the production profile refuses a URL
# without one (flywheel/credentials.py)
PG = "postgresql+psycopg://postgres:pg-test-only-password@127.0.0.1:5432"
REDIS_DB = 11


def postgres_or_skip() -> None:
    import psycopg

    try:
        psycopg.connect("host=127.0.0.1 port=5432 user=postgres dbname=postgres", connect_timeout=3).close()
    except psycopg.OperationalError as exc:
        pytest.skip(f"PostgreSQL is not reachable on 127.0.0.1:5432 ({exc}); the production profile needs it")


@contextmanager
def throwaway_database(prefix: str, migrate: bool = False) -> Iterator[str]:
    """A fresh database on the machine's PostgreSQL (skipped when it is absent), dropped on exit: its URL.
    `migrate`: the project's schema made in it first, as `flywheel db upgrade` does (on PostgreSQL the
    application no longer creates tables itself)."""
    import psycopg

    from flywheel import migrations

    postgres_or_skip()
    name = f"{prefix}_t{uuid.uuid4().hex[:10]}"
    with psycopg.connect("host=127.0.0.1 user=postgres dbname=postgres", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        if migrate:
            migrations.upgrade(f"{PG}/{name}")
        yield f"{PG}/{name}"
    finally:
        with psycopg.connect("host=127.0.0.1 user=postgres dbname=postgres", autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def redis_or_skip(port: int = 6379, db: int = REDIS_DB):
    import redis

    client = redis.Redis(host="127.0.0.1", port=port, db=db, socket_connect_timeout=3)
    try:
        client.ping()
    except redis.ConnectionError as exc:
        pytest.skip(f"Redis is not reachable on 127.0.0.1:{port} ({exc}); the production profile needs it")
    return client


@pytest.fixture
def pg_databases() -> Iterator[dict[str, str]]:
    """Two fresh databases (MLflow; Flywheel's audit log, locks and prediction log), dropped at the end."""
    import psycopg
    from sqlalchemy import create_engine

    from flywheel import migrations

    postgres_or_skip()
    suffix = uuid.uuid4().hex[:10]
    dbs = {"mlflow": f"flywheel_mlflow_t{suffix}", "flywheel": f"flywheel_t{suffix}"}
    with psycopg.connect("host=127.0.0.1 user=postgres dbname=postgres", autocommit=True) as conn:
        for db in dbs.values():
            conn.execute(f'CREATE DATABASE "{db}"')
    try:
        migrations.upgrade(f"{PG}/{dbs['flywheel']}")  # `flywheel db upgrade`: the app makes no tables there
        yield dbs
    finally:
        with psycopg.connect("host=127.0.0.1 user=postgres dbname=postgres", autocommit=True) as conn:
            for db in dbs.values():
                create_engine(f"{PG}/{db}").dispose()
                conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')


def production_variables(dbs: dict[str, str], redis: str) -> dict[str, str]:
    return {
        "FLYWHEEL_STORES__MLFLOW_TRACKING_URI": f"{PG}/{dbs['mlflow']}",
        "FLYWHEEL_STORES__AUDIT_DB_URL": f"{PG}/{dbs['flywheel']}",
        "FLYWHEEL_SERVE__PREDICTION_LOG_URL": f"{PG}/{dbs['flywheel']}",
        "FLYWHEEL_STORES__FEAST_ONLINE__CONNECTION_STRING": redis,
        "FLYWHEEL_STORES__PREFECT_API_URL": "null",  # the test harness is the Prefect API here
        "FLYWHEEL_TRAIN__SEARCH__TRIALS": "1",
        "FLYWHEEL_EVALUATE__GATE_OVERRIDES": "{latency: {service_budget_ms: 60}}",
        "FLYWHEEL_ADMIN_TOKEN": "admin-token-for-the-production-tests",  # the production service needs one
    }


@pytest.fixture
def production_env(tmp_path: Path, pg_databases: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Iterator[dict]:
    """The production profile on the machine's PostgreSQL and Redis (its database 11, flushed at the end)."""
    from tests.conftest import make_home

    redis_client = redis_or_skip()
    home = make_home(tmp_path / "home")
    for k, v in production_variables(pg_databases, f"127.0.0.1:6379,db={REDIS_DB}").items():
        monkeypatch.setenv(k, v)
    try:
        yield {"home": home, "dbs": pg_databases, "redis": redis_client}
    finally:
        redis_client.flushdb()
        shutil.rmtree(home, ignore_errors=True)


class PrivateRedis:
    """A redis-server of the test's own on a free port (append-only file in tmp: data survives a restart),
    so a test can take it down and bring it back without touching the machine's shared Redis."""

    def __init__(self, folder: Path, persist: bool = True) -> None:
        self.folder = folder
        self.persist = persist  # False: no append-only file (benchmarks, tests that never restart it)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.skip("redis-server is not installed: the outage test starts a Redis of its own")
        log = (self.folder / "redis.log").open("ab")
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--dir", str(self.folder),
             "--daemonize", "no",
             *(["--appendonly", "yes", "--appendfsync", "always"] if self.persist else ["--appendonly", "no"])],
            stdout=log, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 20
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise AssertionError(f"redis-server did not start: {(self.folder / 'redis.log').read_text()[-2000:]}")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # by pid: a clean shutdown, the append-only file is complete
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path / "redis")
    server.folder.mkdir()
    server.start()
    try:
        yield server
    finally:
        server.stop()
