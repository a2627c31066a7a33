"""A `flywheel up` stack in a temp project home on free ports, driven through the CLI as a user would,
and its teardown: `flywheel down`, then SIGKILL to whatever `up` recorded that is still ours (by pid and
start time, never by name). Shared by the e2e tests."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import psutil

from tests.conftest import make_home

FLYWHEEL = str(Path(sys.executable).with_name("flywheel"))
WEBHOOK_SECRET = "e2e-webhook-secret-0123456789"  # the shared stack's (tests/e2e/conftest.py)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Stack:
    home: Path
    env: dict[str, str]
    api: str
    up_output: str
    records: list[dict]  # the pid files as `up` wrote them, kept for teardown and the `down` tests

    @property
    def run_dir(self) -> Path:
        return self.home / "data" / "run"

    def cli(self, *args: str, timeout: float = 300, env: dict[str, str] | None = None,
            ) -> subprocess.CompletedProcess[str]:
        return subprocess.run([FLYWHEEL, *args, "--profile", "ci", "--config-dir", str(self.home / "configs")],
                              env={**self.env, **(env or {})}, cwd=self.home, capture_output=True, text=True,
                              timeout=timeout)


def read_records(run_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(run_dir.glob("*.pid"))]


def ours(rec: dict) -> psutil.Process | None:
    """The live process a pid record describes, if the pid still belongs to it."""
    try:
        proc = psutil.Process(rec["pid"])
        if abs(proc.create_time() - rec["create_time"]) < 0.05 and proc.status() != psutil.STATUS_ZOMBIE:
            return proc
    except psutil.Error:
        pass
    return None


@contextmanager
def stack_home(tmp: Path, extra_env: dict[str, str] | None = None) -> Iterator[Stack]:
    """A fresh home on free ports, nothing started; on exit, `flywheel down` and a kill of any leftover."""
    home = make_home(tmp)
    prefect_port, service_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "FLYWHEEL_"))}
    # every port a free one: the suite runs on two xdist workers, and a user's own stack may hold the defaults
    env.update({"FLYWHEEL_STACK__PREFECT_PORT": str(prefect_port), "FLYWHEEL_SERVE__PORT": str(service_port),
                "FLYWHEEL_WEBHOOK__PORT": str(free_port()), "FLYWHEEL_STACK__MLFLOW_UI_PORT": str(free_port()),
                **(extra_env or {})})
    st = Stack(home, env, f"http://127.0.0.1:{prefect_port}/api", "", [])
    try:
        yield st
    finally:
        st.records = st.records or read_records(st.run_dir)
        with suppress(subprocess.TimeoutExpired):
            st.cli("down", timeout=120)
        # whatever `down` missed (a failed test, a broken down): stop it by pid, only if it is still ours
        for rec in st.records:
            if ours(rec) is not None:
                os.killpg(rec["pid"], signal.SIGKILL)
