"""The local Dask cluster the fan-out starts: its workers run without distributed's MALLOC_TRIM_THRESHOLD_ (it
turns off glibc's adaptive mmap threshold; the search's trials ran 10% slower with it) and keep distributed's
other pre-spawn settings (one OpenMP/BLAS thread per worker)."""

from __future__ import annotations

import os

import pytest

from flywheel.settings import ParallelismConfig
from tasks.fanout import running

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _environ() -> dict[str, str | None]:
    return {k: os.environ.get(k) for k in ("MALLOC_TRIM_THRESHOLD_", "OMP_NUM_THREADS")}


@pytest.mark.parametrize("inherited", [None, "65536"])
def test_local_workers_start_without_the_malloc_trim_threshold(inherited, monkeypatch) -> None:
    """Whether or not an earlier cluster in this process left the variable in its environment (distributed's nanny
    sets it there before spawning); the process's environment and distributed's config come back as they were."""
    import dask
    import distributed  # noqa: F401  (its configuration)

    if inherited is None:
        monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    else:
        monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", inherited)
    before = dask.config.get("distributed.nanny.pre-spawn-environ")
    with running(ParallelismConfig(workers=2)) as runner:
        seen = runner.client.run(_environ)
    assert len(seen) == 2
    assert all(env == {"MALLOC_TRIM_THRESHOLD_": None, "OMP_NUM_THREADS": "1"} for env in seen.values()), seen
    assert dask.config.get("distributed.nanny.pre-spawn-environ") == before, "the config is restored"
    assert os.environ.get("MALLOC_TRIM_THRESHOLD_") == inherited, "the environment is restored"


def test_distributed_sets_the_threshold_by_default(monkeypatch) -> None:
    """The control: a LocalCluster started with distributed's defaults sets it, so the test above can fail."""
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)  # the nanny sets it here too: put back after
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        seen = client.run(_environ)
    assert [env["MALLOC_TRIM_THRESHOLD_"] for env in seen.values()] == ["65536"], seen
