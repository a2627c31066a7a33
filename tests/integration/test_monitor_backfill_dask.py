"""A monitoring backfill on a real champion (training flow, MLflow on SQLite) and a real prediction log: four
served hours (calm, then drifted three times) judged in time order, so the alarm waits for the policy's
persistence; then the same backfill with its windows measured on a LocalCluster of 2 worker processes
(monitor.parallelism, Prefect's Dask task runner) records the same verdicts."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from tests.integration.test_monitoring_flow import SERVED, WINDOW_ROWS, _serve, champion_home

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory, prefect_harness: None) -> Path:
    """A champion trained by the real training flow on 15 drift-free days, and four served hours."""
    home = champion_home(tmp_path_factory, "backfill")
    for hour, drift in enumerate((0.0, 1.0, 1.0, 1.0)):
        _serve(home, hour, covariate_drift=drift, seed=300 + hour)
    return home


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as c:
        yield c.scheduler_address


def _backfill(home: Path):
    from flows.monitoring import BackfillParams, monitoring_backfill

    return monitoring_backfill(BackfillParams(profile="ci", config_dir=str(home / "configs"), windows=4,
                                              end=SERVED + timedelta(hours=4)))


def _recorded(home: Path) -> list[tuple]:
    from flywheel.monitoring.history import MonitoringHistory
    from flywheel.settings import load_settings

    history = MonitoringHistory(load_settings(profile="ci", config_dir=home / "configs", environ={}).audit_db_url)
    try:
        return [(r.key, r.rows, r.status, r.streak, r.alarm, r.drifted_features, r.estimated_roc_auc)
                for r in history.windows("churn", "v1")]
    finally:
        history.close()


@pytest.mark.timeout(1800)  # its module trains a champion first: 900 s expired at load 20-30
def test_backfill_judges_in_time_order_and_dask_records_the_same_verdicts(
    home: Path, cluster: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    serial = _backfill(home)
    assert not serial.parallel
    assert [w.rows for w in serial.windows] == [WINDOW_ROWS] * 4
    assert [(w.status, w.streak, w.alarm) for w in serial.windows] == [
        ("ok", 0, False), ("drift", 1, False), ("drift", 2, True), ("drift", 3, True)
    ], "persistence 2: the alarm from the second drifted window in a row"
    recorded_serial = _recorded(home)
    assert len(recorded_serial) == 4

    monkeypatch.setenv("FLYWHEEL_MONITOR__PARALLELISM__ADDRESS", cluster)
    dask = _backfill(home)
    assert dask.parallel
    assert dask.windows == serial.windows
    assert _recorded(home) == recorded_serial, "the same history rows (re-judged windows replace the earlier ones)"
