"""Warming the Dask workers up must not block their event loops: an import run by `client.run` executes on the
worker's event loop, and on a loaded CI machine one outlasted distributed's 30 s TCP timeout (the scheduler
dropped the worker: CommClosedError). `warm_up_workers` runs the imports as tasks, in the workers' threads."""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tasks.fanout import warm_up_workers

MODULE = "flywheel_warmup_probe"


@pytest.fixture
def probe_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A module that records, when imported, which thread imported it."""
    (tmp_path / f"{MODULE}.py").write_text("import threading\nTHREAD = threading.get_ident()\n")
    # worker processes are spawned with this process's sys.path, as it is when the cluster starts
    monkeypatch.syspath_prepend(str(tmp_path))
    return MODULE


@pytest.fixture
def client(probe_module: str) -> Iterator[Any]:
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
            Client(cluster) as c:
        yield c


def _import_thread_and_loop_thread(module: str) -> tuple[int | None, int]:
    """Run by `client.run`, hence on the worker's event loop: (the thread that imported `module`, this thread)."""
    loaded = sys.modules.get(module)
    return (loaded.THREAD if loaded else None), threading.get_ident()


def test_warm_up_imports_on_every_worker_off_its_event_loop(probe_module: str, client: Any) -> None:
    warm_up_workers(client, (probe_module,))
    seen = client.run(_import_thread_and_loop_thread, probe_module)
    assert len(seen) == 2
    for address, (importer, loop) in seen.items():
        assert importer is not None, f"{probe_module} not imported on {address}"
        assert importer != loop, f"{address} imported {probe_module} on its event loop"


def test_the_probe_tells_an_import_on_the_event_loop(probe_module: str, client: Any) -> None:
    """The control: the old warm-up (`client.run(import)`) is seen as on the loop, so the test above can fail."""
    import importlib

    client.run(importlib.import_module, probe_module)
    seen = client.run(_import_thread_and_loop_thread, probe_module)
    assert all(importer == loop for importer, loop in seen.values()), seen
