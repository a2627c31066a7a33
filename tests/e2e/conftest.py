"""The one `flywheel up` stack the e2e modules share (the browser test, then the stack's own CLI tests, whose
last test is `flywheel down`): starting a stack on a busy 2-core machine takes minutes, so the session starts one.

Everything the two modules need is on from the start: the MLflow UI, a webhook secret, three weeks of data to
train on. The browser module trains the champion (v1) and a rejected challenger (v2) on it; the stack module
finds the service healthy then, and `down` ends the stack (the context manager's teardown only sweeps up)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.e2e.stackproc import WEBHOOK_SECRET, Stack, free_port, read_records, stack_home


@pytest.fixture(scope="session")
def local_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    extra = {"FLYWHEEL_WEBHOOK__PORT": str(free_port()), "FLYWHEEL_WEBHOOK_SECRET": WEBHOOK_SECRET,
             "FLYWHEEL_STACK__MLFLOW_UI": "true", "FLYWHEEL_STACK__MLFLOW_UI_PORT": str(free_port()),
             "FLYWHEEL_STACK__START_TIMEOUT_SECONDS": "600"}  # the MLflow UI alone took 85 s to answer here
    with stack_home(tmp_path_factory.mktemp("stack"), extra) as st:
        gen = st.cli("data", "generate", "--days", "21", "--rows-per-day", "500", "--seed", "5")
        assert gen.returncode == 0, gen.stdout + gen.stderr
        up = st.cli("up", timeout=600)
        st.up_output = up.stdout + up.stderr
        st.records = read_records(st.run_dir)
        assert up.returncode == 0, st.up_output
        print("\n" + st.up_output)
        yield st
