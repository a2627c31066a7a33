"""decide_trigger against a real Prefect server (the session's test harness): a fired decision emits exactly
one flywheel.retrain.requested event, with the decision's id; a suppressed one emits none; a deployment
triggered on that event (as the training deployment is) starts a run, which `flywheel retrain` links to its
decision."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flywheel.trigger_decisions import TriggerDecisions
from flywheel.trigger_policy import TriggerPolicy
from flywheel.triggers import RETRAIN_EVENT, drift_signal

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.usefixtures("prefect_harness")]
T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def _events(resource_id: str, wait_s: float, want: int) -> list:
    """flywheel.retrain.requested events about `resource_id`; polls until `want` arrived or `wait_s` passed."""
    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter

    flt = EventFilter(event=EventNameFilter(name=[RETRAIN_EVENT]), resource=EventResourceFilter(id=[resource_id]))
    deadline = time.monotonic() + wait_s
    while True:
        with get_client(sync_client=True) as client:
            found = client.read_events(filter=flt, limit=50).events
        if len(found) >= want or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


def _model(tmp_path: Path) -> str:
    return f"trig_{tmp_path.name.replace('-', '_')}"[:60]  # the harness's server outlives each test


def test_a_fired_decision_emits_one_event_and_a_suppressed_one_none(tmp_path: Path) -> None:
    from prefect import flow
    from prefect.client.orchestration import get_client

    from flywheel.triggers import Decision
    from tasks.triggers import decide_trigger

    model, url = _model(tmp_path), f"sqlite:///{tmp_path}/flywheel.db"

    @flow(name="trigger-decisions-test")
    def two_drift_alarms() -> list[Decision]:
        first = decide_trigger(drift_signal(True, model=model, event_id="window-1", occurred=T0,
                                            evidence={"share_drifted": 0.6}), TriggerPolicy(), url, T0, paused=False)
        second = decide_trigger(drift_signal(True, model=model, event_id="window-2", occurred=T0,
                                             evidence={"share_drifted": 0.7}), TriggerPolicy(), url,
                                T0 + timedelta(hours=1), paused=False)
        return [first, second]

    fired, held = two_drift_alarms()
    assert fired.fired and fired.emitted_at is not None, fired
    assert held.suppressed_by == "cooldown", held.reason
    _events(f"flywheel.model.{model}", wait_s=20, want=1)
    time.sleep(3)  # anything else emitted would have arrived by now
    events = _events(f"flywheel.model.{model}", wait_s=0, want=2)
    assert [str(e.id) for e in events] == [fired.id], "exactly one event, the fired decision's; none for the held one"
    (event,) = events
    assert event.resource["flywheel.model"] == model
    assert event.payload["reason"] == fired.reason and event.payload["evidence"] == {"share_drifted": 0.6}
    assert event.payload["decision_id"] == fired.id and event.payload["signal_event_id"] == "window-1"

    store = TriggerDecisions(url)
    assert [d.outcome for d in store.decisions(model)] == ["suppressed", "fire"]
    store.dispose()
    with get_client(sync_client=True) as client:
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

        keys = [a.key for a in client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[f"trigger-{model}".replace("_", "-")])))]
    assert len(keys) == 2, "one markdown artifact per decision, fired or suppressed"


def test_flywheel_retrain_starts_the_triggered_deployment_and_links_its_run(home: Path, tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.events import DeploymentEventTrigger
    from prefect.settings import PREFECT_API_URL

    from flywheel.cli import app

    model = _model(tmp_path)

    @flow(name=f"train-{model}")
    def fake_training(reason: str | None = None) -> str | None:
        return reason

    # the training deployment's trigger, as deployments/prefect.yaml declares it (here for this model only)
    trigger = DeploymentEventTrigger(match={"prefect.resource.id": f"flywheel.model.{model}"},
                                     expect={RETRAIN_EVENT}, parameters={"reason": "{{ event.payload.reason }}"})
    deployment_id = fake_training.to_deployment(name="training", triggers=[trigger]).apply()
    # on SQLite the server loads a new automation in a task scheduled after its commit, with nothing to poll
    # for it: 2 s was once too short beside other test files on the busy machine
    time.sleep(6)

    monkeypatch.setenv("PREFECT_API_URL", PREFECT_API_URL.value())
    monkeypatch.setenv("FLYWHEEL_REGISTER__MODEL_NAME", model)  # the model this home's training deployment trains
    args = ["--profile", "ci", "--config-dir", str(home / "configs")]
    request_id = f"req-{uuid.uuid4()}"
    res = CliRunner().invoke(app, ["retrain", "--model", model, "--reason", "labels reviewed",
                                   "--request-id", request_id, "--wait", "45", *args])
    assert res.exit_code == 0, res.output
    assert "fire" in res.output and "training run started" in res.output, res.output

    store = TriggerDecisions(f"sqlite:///{home}/data/flywheel.db")
    (decision,) = store.decisions(model)
    store.dispose()
    assert decision.kind == "retrain_requested" and decision.flow_run_id, decision
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(uuid.UUID(decision.flow_run_id))
    assert run.deployment_id == deployment_id
    assert run.parameters["reason"] == decision.reason and "labels reviewed" in decision.reason

    again = CliRunner().invoke(app, ["retrain", "--model", model, "--reason", "labels reviewed",
                                     "--request-id", request_id, "--wait", "0", *args])
    assert again.exit_code == 1, again.output
    assert f"duplicate of {decision.id}" in again.output


def test_flywheel_retrain_without_a_prefect_server_refuses_before_recording(home: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from flywheel.cli import app

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    res = CliRunner().invoke(app, ["retrain", "--reason", "x", "--profile", "ci", "--config-dir",
                                   str(home / "configs")])
    assert res.exit_code == 2 and "no Prefect server to carry the request" in res.output, res.output
    assert not (home / "data" / "flywheel.db").exists(), "nothing recorded for a request nobody could carry"


def test_flywheel_retrain_refuses_a_model_the_training_deployment_does_not_train(home: Path) -> None:
    from flywheel.cli import app

    res = CliRunner().invoke(app, ["retrain", "--model", "fraud", "--reason", "x", "--profile", "ci",
                                   "--config-dir", str(home / "configs")])
    assert res.exit_code == 2 and "trains 'churn', not 'fraud'" in res.output, res.output
