"""The receiver in `flywheel up`'s plan, and the training deployment's trigger on `flywheel.retrain.requested`."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml

from flywheel import stack
from flywheel.settings import load_settings
from tests.conftest import PROJECT

SECRET = "a-shared-secret-for-the-tests"


def test_up_plans_the_receiver_when_its_secret_is_set_and_only_it_gets_the_secret(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLYWHEEL_WEBHOOK_SECRET", SECRET)
    monkeypatch.setenv("FLYWHEEL_WEBHOOK_SECRET_PREVIOUS", SECRET + "-old")
    s = load_settings("ci", home / "configs", environ={},
                      overrides={"stack": {"prefect_port": 4321}, "webhook": {"port": 8765}})
    specs = {p.name: p for p in stack.plan(s, "ci", home / "configs")}
    assert list(specs) == ["prefect", "deployments", "service", "webhook"]
    hook = specs["webhook"]
    assert hook.argv[1:3] == ["-m", "flywheel.webhook"]
    assert hook.argv[-4:] == ["--host", "127.0.0.1", "--port", "8765"]
    assert str(home / "configs") in hook.argv and "ci" in hook.argv
    assert hook.env["PREFECT_API_URL"] == "http://127.0.0.1:4321/api"  # events go to the stack's server
    assert (hook.health_url, hook.wait) == ("http://127.0.0.1:8765/health", "ok")
    assert hook.env["FLYWHEEL_WEBHOOK_SECRET"] == SECRET and hook.env["FLYWHEEL_WEBHOOK_SECRET_PREVIOUS"]
    for name in ("prefect", "deployments", "service"):  # least privilege: nobody else holds the secrets
        assert "FLYWHEEL_WEBHOOK_SECRET" not in specs[name].env
        assert "FLYWHEEL_WEBHOOK_SECRET_PREVIOUS" not in specs[name].env
    assert stack.ORDER.index("webhook") == stack.ORDER.index("service") + 1  # `down` stops it before the service


def test_without_its_secret_up_leaves_the_receiver_out(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FLYWHEEL_WEBHOOK_SECRET", raising=False)
    s = load_settings("ci", home / "configs", environ={})
    assert [p.name for p in stack.plan(s, "ci", home / "configs")] == ["prefect", "deployments", "service"]


def test_prefect_yaml_runs_training_on_retrain_requests_one_at_a_time() -> None:
    spec = yaml.safe_load((PROJECT / "deployments" / "prefect.yaml").read_text())
    training = next(d for d in spec["deployments"] if d["name"] == "training")
    assert training["concurrency_limit"] == {"limit": 1, "collision_strategy": "ENQUEUE"}
    [trigger] = training["triggers"]
    assert trigger["expect"] == ["flywheel.retrain.requested"]
    assert trigger["match"] == {"prefect.resource.id": "flywheel.model.*"}
    assert "flywheel.retrain.requested" in trigger["name"] and "flywheel.retrain.requested" in trigger["description"]
    assert trigger["parameters"]["params"] == {"reason": "{{ event.payload.reason }}",
                                               "decision_id": "{{ event.payload.decision_id }}",
                                               "trigger": "{{ event.payload.kind }}",
                                               "training_source": "{{ event.payload.training_source | default(none) }}"}
    # the event the receiver builds has exactly what the trigger reads
    from flywheel.webhook import HOOKS, RetrainBody, build_event

    event = build_event(HOOKS["retrain"], RetrainBody(reason="why"), "d", datetime.now(UTC), "churn")
    assert event["event"] == "flywheel.retrain.requested" and event["payload"]["reason"] == "why"
    assert event["resource"]["prefect.resource.id"].startswith("flywheel.model.")


@pytest.mark.slow
def test_served_training_deployment_has_the_trigger_and_the_enqueueing_limit(home: Path) -> None:
    from prefect.client.schemas.objects import ConcurrencyLimitStrategy
    from prefect.events import DeploymentEventTrigger

    from flows.serve_deployments import build_deployments

    built = {d.name: d for d in build_deployments(load_settings("ci", home / "configs", environ={}), "ci",
                                                  str(home / "configs"))}
    training = built["training"]
    assert training.concurrency_limit == 1
    assert training.concurrency_options.collision_strategy == ConcurrencyLimitStrategy.ENQUEUE
    [trigger] = training.triggers
    assert isinstance(trigger, DeploymentEventTrigger)
    assert trigger.name == "train on flywheel.retrain.requested"
    assert trigger.expect == {"flywheel.retrain.requested"}
    # checked against TrainingParams at start; the run settings ride along (a trigger replaces `params`)
    assert trigger.parameters["params"] == {"reason": "{{ event.payload.reason }}",
                                            "decision_id": "{{ event.payload.decision_id }}",
                                            "trigger": "{{ event.payload.kind }}",
                                            "training_source": "{{ event.payload.training_source | default(none) }}",
                                            "profile": "ci", "config_dir": str(home / "configs")}
    # what the trigger renders reaches the run: an event without decision_id/kind renders "" (= not given);
    # the kind is tagged on the registered version (the rollout picks its plan by it)
    from flows.training import TrainingParams, trigger_tag

    rendered = TrainingParams.model_validate({"reason": "drift_detected: drift alarm raised", "decision_id": "",
                                              "trigger": "drift_detected", "training_source": "", "profile": "ci"})
    assert (rendered.decision_id, rendered.trigger, rendered.training_source) == (None, "drift_detected", None)
    assert trigger_tag(rendered.trigger) == {"flywheel.trigger": "drift_detected"} and trigger_tag(None) == {}
    assert built["batch-scoring"].concurrency_limit is None  # only training is limited
    assert built["rollout"].concurrency_limit is None
