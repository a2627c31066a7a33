"""What a training run trains on: the run's `training_source` (a trigger rule's, through the retrain event and
the deployment trigger's template), else the dataset definition's; bad values fail naming the key."""

from __future__ import annotations

import json

import pytest
import yaml
from pydantic import ValidationError

from flows.training import TrainingParams, training_source
from flywheel.errors import FlywheelError
from flywheel.schemas import DatasetDefinition, load_dataset
from tests.conftest import PROJECT


@pytest.fixture(scope="module")
def churn() -> DatasetDefinition:
    return load_dataset(PROJECT / "configs" / "datasets" / "churn.yaml")


def test_the_run_parameter_overrides_the_dataset_and_empty_means_the_dataset_own(churn: DatasetDefinition) -> None:
    assert churn.training_source == "offline_store"
    assert training_source(TrainingParams(), churn) == "offline_store"
    assert training_source(TrainingParams(training_source="served_features"), churn) == "served_features"
    # a trigger whose event carried no training_source renders the template as ""
    assert TrainingParams(training_source="").training_source is None
    served = churn.model_copy(update={"training_source": "served_features"})
    assert training_source(TrainingParams(training_source="offline_store"), served) == "offline_store"


def test_a_bad_training_source_fails_naming_the_key() -> None:
    with pytest.raises(ValidationError) as err:
        TrainingParams(training_source="prediction_log")
    (problem,) = err.value.errors()
    assert problem["loc"] == ("training_source",) and "'offline_store' or 'served_features'" in problem["msg"]


def test_served_features_for_a_dataset_without_outcomes_fail_before_training(churn: DatasetDefinition) -> None:
    bare = churn.model_copy(update={"outcomes": None})
    with pytest.raises(FlywheelError, match=r"training_source=served_features .* dataset 'churn' declares no "
                                            r"`outcomes`"):
        training_source(TrainingParams(training_source="served_features"), bare)
    assert training_source(TrainingParams(), bare) == "offline_store"


def _render(template: str, payload: dict) -> object:
    """A trigger parameter as Prefect's automation renders it (a single expression keeps its JSON type)."""
    from prefect.server.events.actions import RunDeployment
    from prefect.server.utilities.user_templates import render_user_template_sync

    wrapped = RunDeployment._wrap_v1_template(template)
    return json.loads(render_user_template_sync(wrapped["value"]["template"], {"event": {"payload": payload}}))


def test_the_training_deployment_trigger_passes_the_rule_training_source_on() -> None:
    """deployments/prefect.yaml renders the retrain event's payload into the run's parameters, whether the event
    carries `training_source` (a rule's) or not (the webhook's events): Prefect fails the whole action, and
    starts no run, on a key its template cannot render."""
    from datetime import UTC, datetime

    from flywheel.webhook import HOOKS, RetrainBody, build_event

    spec = yaml.safe_load((PROJECT / "deployments" / "prefect.yaml").read_text())
    (training,) = [d for d in spec["deployments"] if d["name"] == "training"]
    (trigger,) = training["triggers"]
    params = trigger["parameters"]["params"]
    assert set(params) <= set(TrainingParams.model_fields)
    ruled = {"reason": "drift_detected: drift alarm raised", "decision_id": "d1", "kind": "drift_detected",
             "training_source": "served_features"}
    from flywheel.trigger_policy import TriggerPolicy
    from flywheel.triggers import History, decide, request_signal

    now = datetime.now(UTC)
    asked = decide(request_signal(model="churn", reason="why", actor="webhook", event_id="webhook:d", occurred=now),
                   History(), TriggerPolicy(), False, now)  # the receiver records a decision for each retrain
    hooked = build_event(HOOKS["retrain"], RetrainBody(reason="why"), "d", now, "churn", asked)["payload"]
    assert "training_source" not in hooked
    for payload, want in ((ruled, "served_features"), (hooked, None)):
        rendered = TrainingParams.model_validate({k: _render(t, payload) for k, t in params.items()})
        assert rendered.training_source == want, (payload, rendered)
