"""register_model on a real MLflow (SQLite) and project database: one version per (data digest, config digest),
and a version an earlier attempt left half-registered is finished by the retry of the same run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline

from flywheel.schemas import GateReport, GateResult

pytestmark = [pytest.mark.integration]

DATA, CONFIG = "a" * 64, "b" * 64


@pytest.fixture
def setup(mlflow_uri: str, tmp_path: Path) -> dict:
    import mlflow

    client = mlflow.MlflowClient(mlflow_uri, registry_uri=mlflow_uri)
    experiment_id = client.create_experiment("dups", artifact_location=str(tmp_path / "artifacts"))
    rng = np.random.default_rng(0)
    x = pd.DataFrame({"a": rng.random(200), "b": rng.random(200)})
    pipe = make_pipeline(SimpleImputer(), LogisticRegression()).fit(x, (x["a"] > 0.5).astype(int))
    report = GateReport(results=[GateResult(rule="primary", value=0.9, threshold=">= 0.6", passed=True)])
    return {"client": client, "experiment": experiment_id, "x": x, "pipe": pipe, "report": report,
            "uri": mlflow_uri, "audit": f"sqlite:///{tmp_path}/flywheel.db"}


def _register(s: dict, lineage: dict[str, str], run_id: str | None = None):
    from tasks.register import register_model

    run_id = run_id or s["client"].create_run(s["experiment"]).info.run_id
    return register_model.fn(s["pipe"], s["x"].head(3), run_id, "dup", s["report"], None, lineage, s["uri"],
                             s["audit"], "test")


def test_the_same_data_and_config_registers_one_version(setup: dict) -> None:
    from flywheel.audit import AuditLog

    lineage = {"flywheel.data_hash": DATA, "flywheel.config_digest": CONFIG}
    first = _register(setup, lineage)
    second = _register(setup, lineage)
    assert (first.outcome, first.version) == ("champion", "1")
    assert (second.outcome, second.version, second.alias) == ("duplicate", "1", "champion")
    assert "same data and config as dup v1" in (second.reason or "")
    client = setup["client"]
    assert [str(v.version) for v in client.search_model_versions("name = 'dup'")] == ["1"]
    # the duplicate's MLflow run says which version it is, and no alias moved for it
    dup_runs = client.search_runs([setup["experiment"]], "tags.`flywheel.duplicate_of` = 'dup v1'")
    assert len(dup_runs) == 1
    assert [(e.alias, e.to_version) for e in AuditLog(setup["audit"]).entries("dup")] == [("champion", "1")]


def test_another_config_registers_another_version(setup: dict) -> None:
    first = _register(setup, {"flywheel.data_hash": DATA, "flywheel.config_digest": CONFIG})
    other = _register(setup, {"flywheel.data_hash": DATA, "flywheel.config_digest": "c" * 64})
    assert first.version == "1" and other.version == "2" and other.outcome != "duplicate"


def test_without_digests_every_training_registers(setup: dict) -> None:
    assert [_register(setup, {}).version for _ in range(2)] == ["1", "2"]


def test_a_retry_finishes_a_version_left_without_digests(setup: dict) -> None:
    """An attempt created the version, then lost its store before writing the digests and could not take the
    version back: the retry of the same run finishes that version instead of registering a second one."""
    import mlflow

    from flywheel.audit import AuditLog
    from flywheel.registry import Registry, log_model

    client = setup["client"]
    run_id = client.create_run(setup["experiment"]).info.run_id
    with mlflow.start_run(run_id=run_id):
        uri = log_model(setup["pipe"], setup["x"].head(3))
    client.create_registered_model("dup")
    client.create_model_version("dup", source=uri, run_id=run_id, model_id=uri.removeprefix("models:/"))
    registry = Registry(setup["uri"], AuditLog(setup["audit"]))
    with pytest.raises(Exception, match="no recorded digests"):
        registry.load("dup", version="1")

    outcome = _register(setup, {"flywheel.data_hash": DATA, "flywheel.config_digest": CONFIG}, run_id=run_id)

    assert (outcome.outcome, outcome.version) == ("champion", "1")
    assert [str(v.version) for v in client.search_model_versions("name = 'dup'")] == ["1"]
    assert registry.load("dup", alias="champion").version == "1"  # digests written and verified
