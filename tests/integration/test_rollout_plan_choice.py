"""Why a challenger was trained picks its rollout plan: the trigger tag on its registered version (real MLflow
registry on SQLite), read by the rollout's `resolve_rollout_target`, mapped by configs/rollout.yaml's
`by_trigger` in `load_rollout_plan`: the two tasks the rollout flow runs before choosing its strategy."""

from __future__ import annotations

from pathlib import Path

import pytest

from flywheel.registry import TAG_TRIGGER
from tests.conftest import PROJECT

pytestmark = [pytest.mark.integration]


@pytest.fixture
def registered(mlflow_uri: str, tmp_path: Path) -> str:
    """churn v1 champion (trained on a schedule), v2 challenger retrained after drift, v3 asked for by a person."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_uri, registry_uri=mlflow_uri)
    client.create_registered_model("churn")
    for trigger in (None, "drift_detected", "retrain_requested"):
        (tmp_path / "model").mkdir(exist_ok=True)
        client.create_model_version("churn", str(tmp_path / "model"), tags={TAG_TRIGGER: trigger} if trigger else {})
    client.set_registered_model_alias("churn", "champion", "1")
    client.set_registered_model_alias("churn", "challenger", "2")
    return mlflow_uri


def test_a_drift_retrained_challenger_is_rolled_out_by_the_after_drift_plan(registered: str, tmp_path: Path) -> None:
    from tasks.rollout import load_rollout_plan, resolve_rollout_target

    audit = f"sqlite:///{tmp_path}/flywheel.db"
    plans = PROJECT / "configs" / "rollout.yaml"
    target = resolve_rollout_target.fn(registered, audit, "churn", None, "test")
    assert (target.champion, target.challenger, target.trigger) == ("1", "2", "drift_detected")
    chosen = load_rollout_plan.fn(plans, None, target.trigger)
    assert chosen.name == "after_drift" and chosen.plan.guards.prediction_shift == "report"
    assert load_rollout_plan.fn(plans, "canary", target.trigger).name == "canary"  # a named plan wins

    # a challenger asked for by a person, or registered without a trigger, gets the default plan
    other = resolve_rollout_target.fn(registered, audit, "churn", "3", "test")
    assert other.trigger == "retrain_requested"
    assert load_rollout_plan.fn(plans, None, other.trigger).name == "canary"
    assert load_rollout_plan.fn(plans, None, None).name == "canary"
