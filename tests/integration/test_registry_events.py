"""register_model inside a real Prefect flow (test harness): the registration event reaches the server."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline

from flywheel.schemas import GateReport, GateResult

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.usefixtures("prefect_harness")]


def _events(prefix: str, resource_id: str, wait_s: float = 15.0) -> list:
    """Events named `prefix*` about `resource_id`; the server stores them asynchronously, so poll."""
    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter

    flt = EventFilter(event=EventNameFilter(prefix=[prefix]), resource=EventResourceFilter(id=[resource_id]))
    deadline = time.monotonic() + wait_s
    while True:
        with get_client(sync_client=True) as client:
            found = client.read_events(filter=flt, limit=10).events  # server max is 50, client default 100
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


def test_first_champion_event_is_emitted_in_a_flow(mlflow_uri: str, tmp_path: Path) -> None:
    import mlflow
    from prefect import flow

    from tasks.register import RegistrationOutcome, register_model

    client = mlflow.MlflowClient(mlflow_uri)
    experiment_id = client.create_experiment("events", artifact_location=str(tmp_path / "artifacts"))
    rng = np.random.default_rng(0)
    x = pd.DataFrame({"a": rng.random(200), "b": rng.random(200)})
    pipe: Pipeline = make_pipeline(SimpleImputer(), LogisticRegression()).fit(x, (x["a"] > 0.5).astype(int))
    report = GateReport(results=[GateResult(rule="primary", value=0.9, threshold=">= 0.6", passed=True)])
    audit_url = f"sqlite:///{tmp_path}/flywheel.db"
    name = f"events_{tmp_path.name.replace('-', '_')}"  # the harness's server outlives this test

    @flow(name="register-events-test")
    def register_once() -> RegistrationOutcome:
        run_id = client.create_run(experiment_id).info.run_id
        return register_model(pipe, x.head(3), run_id, name, report, None, {}, mlflow_uri, audit_url, "test")

    outcome = register_once()
    assert outcome.outcome == "champion" and outcome.event == "flywheel.model.champion-registered"
    events = _events("flywheel.model.", f"flywheel.model.{name}.1")
    assert [e.event for e in events] == ["flywheel.model.champion-registered"]
    assert events[0].payload["version"] == "1" and events[0].payload["gates"]["passed"] is True
