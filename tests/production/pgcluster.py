"""A private PostgreSQL cluster for tests that stop and restart the database: made with `initdb` in a temp folder,
served on a free port by a `postgres` process the test started, stopped by that pid. Never the machine's own.

As root (containers), initdb refuses to run: the cluster then belongs to the `postgres` system user and the server
runs as that user (`setpriv` execs it, so the pid the test holds is the postmaster's).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path


def pg_bin() -> Path | None:
    """The folder holding initdb and postgres (PATH first, then Debian's /usr/lib/postgresql/<n>/bin)."""
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    return Path(candidates[-1]).parent if candidates else None


def skip_reason() -> str | None:
    """Why a private cluster cannot be made here (None when it can)."""
    if pg_bin() is None:
        return "initdb is not installed (a PostgreSQL server package); the restart test starts a cluster of its own"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root without a `postgres` user: initdb refuses to run as root"
        if shutil.which("setpriv") is None:
            return "running as root without setpriv to start the cluster as the `postgres` user"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrivatePostgres:
    """initdb + a postgres process on 127.0.0.1:<free port>, trust auth, fsync off (a throwaway cluster)."""

    def __init__(self) -> None:
        self.bin = pg_bin()
        assert self.bin is not None, skip_reason()
        self.folder = Path(tempfile.mkdtemp(prefix="flywheel-pgcluster-"))
        self.data = self.folder / "data"
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = self.folder / "postgres.log"
        self._as: list[str] = []
        if os.geteuid() == 0:
            user = pwd.getpwnam("postgres")
            os.chown(self.folder, user.pw_uid, user.pw_gid)
            self._as = ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups", "--"]

    @property
    def dsn(self) -> str:
        return f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres"

    def url(self, database: str) -> str:
        # trust auth ignores the password; the production profile refuses a URL without one
        return f"postgresql+psycopg://postgres:pg-test-only-password@127.0.0.1:{self.port}/{database}"

    def init(self) -> None:
        done = subprocess.run([*self._as, str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres",
                               "-A", "trust", "-E", "UTF8", "--no-sync"], capture_output=True, text=True, timeout=180)
        if done.returncode != 0:
            raise AssertionError(f"initdb failed: {done.stdout}{done.stderr}")

    def start(self, timeout_s: float = 60) -> None:
        out = self.log.open("ab")
        self.proc = subprocess.Popen(
            [*self._as, str(self.bin / "postgres"), "-D", str(self.data), "-p", str(self.port),
             "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={self.folder}",
             "-c", "fsync=off", "-c", "max_connections=200"],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        out.close()
        self.wait_ready(timeout_s)

    def wait_ready(self, timeout_s: float) -> None:
        import psycopg

        deadline = time.monotonic() + timeout_s
        while True:
            try:
                psycopg.connect(self.dsn, connect_timeout=2).close()
                return
            except psycopg.OperationalError:
                if self.proc is None or self.proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"private postgres did not start: {self.log.read_text()[-2000:]}") from None
                time.sleep(0.2)

    def stop(self, timeout_s: float = 30) -> None:
        """Fast shutdown by pid (SIGINT to the postmaster: clients are disconnected, work in flight rolled back)."""
        if self.proc is None or self.proc.poll() is not None:
            self.proc = None
            return
        os.kill(self.proc.pid, signal.SIGINT)
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None

    def restart(self, pause_s: float = 3.0) -> float:
        """Stop, stay down `pause_s`, start again on the same port; seconds the database was unreachable."""
        t0 = time.monotonic()
        self.stop()
        time.sleep(pause_s)
        self.start()
        return time.monotonic() - t0

    def create_database(self, name: str) -> None:
        import psycopg

        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.folder, ignore_errors=True)
