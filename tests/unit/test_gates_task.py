"""The evaluate_candidate task logs its gate values into a real MLflow run; reports name the versions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.dummy import DummyClassifier
from sklearn.pipeline import make_pipeline

from flywheel.gates import labels
from flywheel.schemas import load_dataset
from tasks.evaluate import evaluate_candidate, gate_metric_name, render_named_gate_report, report_json, versions_label
from tests.unit.test_gates import PROJECT, gates, logreg


def test_gate_metric_names_are_valid_mlflow_keys():
    assert gate_metric_name("slice:region=north") == "gate.slice_region_north"
    assert gate_metric_name("behavioral:more_tickets_more_risk") == "gate.behavioral_more_tickets_more_risk"
    assert gate_metric_name("primary") == "gate.primary"


@pytest.mark.integration
@pytest.mark.slow
def test_evaluate_candidate_logs_report_and_metrics_to_mlflow(
    mlflow_uri: str, tmp_path: Path, small_batches: list[pd.DataFrame]
):
    from mlflow.tracking import MlflowClient

    ds = load_dataset(PROJECT / "configs" / "datasets" / "churn.yaml")
    train, holdout = pd.concat(small_batches[:10]), pd.concat(small_batches[10:])
    x, y = train[ds.feature_names], labels(train, ds)
    candidate = logreg(ds).fit(x, y)
    champion = logreg(ds).fit(x, np.random.default_rng(1).permutation(y))
    baseline = make_pipeline(DummyClassifier(strategy="prior")).fit(x, y)

    client = MlflowClient()
    exp = client.create_experiment("gates-test", artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = client.create_run(exp).info.run_id

    report = evaluate_candidate.fn(
        candidate, champion, baseline, holdout, ds, gates(), 0.86, 0.84, run_id, mlflow_uri, 0, "candidate", "3"
    )
    assert report.passed, report.failed_rules

    # the report is stored by registration, once the candidate has a version to be named by
    assert not client.list_artifacts(run_id, "gates")
    assert report.champion_version == "3" and report.candidate_version is None
    assert versions_label("churn", report) == "churn candidate vs champion v3"
    named = report.model_copy(update={"candidate_version": "4"})
    md = render_named_gate_report("churn", named)
    assert md.startswith("# Gate report: churn v4 vs champion v3") and "**Verdict: PASSED**" in md
    assert "| vs_champion |" in md
    assert json.loads(report_json(named))["candidate_version"] == "4"

    metrics = client.get_run(run_id).data.metrics
    numeric = {gate_metric_name(r.rule): r.value for r in report.results if r.value is not None}
    for key, value in numeric.items():
        assert metrics[key] == pytest.approx(value), key
    assert metrics["gate.passed"] == 1.0
    assert {"gate.primary", "gate.vs_champion", "gate.latency", "gate.slice_region_north"} <= set(metrics)
    assert len(client.get_metric_history(run_id, "gate.primary")) == 1
