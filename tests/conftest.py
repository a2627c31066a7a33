"""Shared fixtures. Every store lives in a temp folder; nothing is written to the working tree."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

PROJECT = Path(__file__).resolve().parents[1]

# Telemetry off for everything the tests start (the entry points do the same via apply_runtime_environment).
for _var, _val in {
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "GX_ANALYTICS_ENABLED": "false",
    "FEAST_USAGE": "False",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
}.items():
    os.environ.setdefault(_var, _val)


# `make test` runs the suite on two pytest-xdist workers: each group below runs whole on one worker, in this
# order. A module is a group, so its module-scoped fixtures start once; the e2e modules are one group (each starts
# a whole stack; the demo holds a core busy on purpose), and so are the production modules (PostgreSQL's 100
# connections, Redis database 11 flushed after each test, the private clusters). The longest groups go first: the
# scheduler hands groups out in collection order, and one started last is the run's tail. (xdist's own
# `--dist loadgroup` ignores `xdist_group` marks under pytest 9.2: the groups are made by the scheduler below.)
_SHARED_GROUPS = ("production", "e2e")
_GROUP_ORDER = (*_SHARED_GROUPS, "tests/integration/", "tests/unit/")


def suite_group(nodeid: str) -> str:
    """The group a test runs in: `production`, `e2e`, or its module's path."""
    path = nodeid.split("::", 1)[0]
    return next((g for g in _SHARED_GROUPS if path.startswith(f"tests/{g}/")), path)


# tests/e2e/conftest.py's shared stack is stopped by test_stack.py's last test (`flywheel down`): it goes last
_LAST_MODULES = ("tests/e2e/test_stack.py",)


def _group_rank(nodeid: str) -> tuple[int, bool]:
    group = suite_group(nodeid)
    rank = next((i for i, prefix in enumerate(_GROUP_ORDER) if group.startswith(prefix)), len(_GROUP_ORDER))
    return rank, nodeid.split("::", 1)[0] in _LAST_MODULES


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: _group_rank(item.nodeid))  # stable: collection order inside a group


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """xdist's scope scheduler with `suite_group` as the scope: a group's tests all go to one worker."""
    from xdist.scheduler import LoadScopeScheduling

    class GroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return suite_group(nodeid)

    return GroupScheduling(config, log)


def make_home(tmp: Path) -> Path:
    """A project home in `tmp`: a copy of configs/ and feature_repo/, data/ empty."""
    shutil.copytree(PROJECT / "configs", tmp / "configs")
    if (PROJECT / "feature_repo").exists():
        shutil.copytree(PROJECT / "feature_repo", tmp / "feature_repo")
    (tmp / "data").mkdir()
    return tmp


def outcome_batch_stamp(url: str) -> datetime:
    """`ingested_at` of the one outcome batch in the project database at `url` (UTC when stored naive)."""
    import sqlalchemy as sa

    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            (stamp,) = conn.execute(sa.text("SELECT ingested_at FROM flywheel_outcome_batches")).scalars()
    finally:
        engine.dispose()
    stamp = datetime.fromisoformat(stamp) if isinstance(stamp, str) else stamp
    return stamp.replace(tzinfo=stamp.tzinfo or UTC)


def train_champion_and_challenger(home: Path, spec) -> None:
    """Run the training pipeline (ci profile) on the first 21 days of `spec`, then again after the rest
    arrive: the registry ends with champion v1 and challenger v2, the online store materialized."""
    from flows.training import TrainingParams, training_pipeline
    from flywheel.datagen import write_batches

    files = write_batches(spec, home / "data" / "staging")
    incoming = home / "data" / "incoming" / "churn"
    incoming.mkdir(parents=True, exist_ok=True)
    for batch, expected in ((files[:21], "champion"), (files[21:], "challenger")):
        for f in batch:
            shutil.copy2(f, incoming / f.name)
        result = training_pipeline(TrainingParams(profile="ci", config_dir=str(home / "configs")))
        assert result.alias == expected, f"expected a {expected}, got {result}"


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return make_home(tmp_path)


@pytest.fixture
def settings(home: Path):
    """Settings for a fresh home (profile ci), with the runtime environment applied."""
    from flywheel.settings import apply_runtime_environment, load_settings

    s = load_settings(profile="ci", config_dir=home / "configs", environ={})
    apply_runtime_environment(s)
    return s


@pytest.fixture
def dataset(settings):
    from flywheel.schemas import load_dataset

    return load_dataset(settings.resolve(settings.dataset))


@pytest.fixture(scope="session")
def small_batches() -> list[pd.DataFrame]:
    """14 daily churn batches of 300 rows (seed 7): small enough for unit tests."""
    from flywheel.datagen import GeneratorSpec, generate

    return [df for _, df in generate(GeneratorSpec(seed=7, days=14, rows_per_day=300, customers=2000))]


@pytest.fixture(scope="session")
def mlflow_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty, fully migrated MLflow SQLite database: migrations cost 5-10 s on 2 cores, a copy is free."""
    import mlflow

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    mlflow.MlflowClient(f"sqlite:///{path}").search_experiments()  # runs the migrations
    return path


@pytest.fixture
def mlflow_uri(mlflow_template: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A real MLflow tracking store (SQLite) of the test's own, in a temp folder."""
    import mlflow

    shutil.copy(mlflow_template, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    yield uri
    mlflow.set_tracking_uri(None)
    mlflow.set_registry_uri(None)


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    """One Prefect test server per session; heartbeats off (each costs ~1 s at the end of a flow)."""
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    # 120 s expired at load 20-30 on the shared 2-core machine (the benchmarks wait up to 900 s)
    with prefect_test_harness(server_startup_timeout=600), temporary_settings(
        {PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}
    ):
        yield
