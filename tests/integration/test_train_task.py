"""The training task against a real MLflow (SQLite in tmp): one parent run, a child run per trial."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from flywheel import training
from flywheel.schemas import GatesConfig, load_gates
from flywheel.settings import SearchConfig, TrainConfig
from tasks.train import TrainOutcome, train_model

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture
def split(small_batches: list[pd.DataFrame], dataset) -> training.Split:
    return training.split_by_time(pd.concat(small_batches, ignore_index=True), dataset)


def test_train_model_tracks_parent_and_child_runs(split, dataset, settings, mlflow_uri: str, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    cfg = TrainConfig(
        seed=5,
        experiment="flywheel-test",
        families=["logistic_regression", "hist_gradient_boosting"],
        search=SearchConfig(method="random", trials=2, metric="roc_auc"),
        search_space={
            "logistic_regression": {"C": [0.1, 1.0]},
            "hist_gradient_boosting": {"max_iter": [30, 60], "max_depth": [3]},
        },
    )
    artifacts = tmp_path / "artifacts"
    lineage = {"flywheel.data_hash": "abc123", "flywheel.feature_service": "churn_v1"}
    gates = load_gates(settings.resolve(settings.evaluate.gates_file))  # the shipped best_single_feature baseline
    out = train_model.fn(split, dataset, cfg, gates, mlflow_uri, str(artifacts), lineage)

    assert isinstance(out, TrainOutcome)
    assert out.trials == 4 and out.family in cfg.families and out.metric == "roc_auc"
    assert 0.7 < out.holdout_metric == out.holdout_metrics["roc_auc"] <= 1
    # the baseline is a real one-feature model fitted on the same split, not the prior (0.5)
    assert out.baseline.kind == "best_single_feature" and out.baseline.feature in dataset.feature_names
    base_auc = training.score(out.baseline.pipeline, split.holdout, dataset, "roc_auc")
    assert out.baseline_holdout_metric == pytest.approx(base_auc)
    assert 0.6 < out.baseline_holdout_metric < out.holdout_metric - gates.baseline.min_margin
    assert out.train_metric > 0.5 and out.validation_metric > 0.5
    assert set(out.feature_importance) == set(dataset.feature_names)
    assert "region=north" in out.slice_metrics
    assert out.timings["time.search_s"] > 0 and "time.fit_final_s" in out.timings
    one = pd.DataFrame([{c: None for c in dataset.feature_names}])
    assert out.pipeline.predict_proba(one).shape == (1, 2)

    client = MlflowClient(tracking_uri=mlflow_uri)
    exp = client.get_experiment_by_name("flywheel-test")
    assert exp.experiment_id == out.experiment_id
    assert Path(exp.artifact_location.removeprefix("file://")) == artifacts.resolve()

    parent = client.get_run(out.run_id)
    assert parent.info.status == "FINISHED"
    assert parent.info.run_name == f"train-churn-{out.family}"
    p = parent.data
    assert p.params["family"] == out.family
    assert p.params["search.method"] == "random" and p.params["seed"] == "5"
    assert (p.params["baseline.kind"], p.params["baseline.feature"]) == ("best_single_feature", out.baseline.feature)
    assert all(p.params[f"model.{k}"] == str(v) for k, v in out.params.items())
    for name in (
        "train.roc_auc",
        "validation.roc_auc",
        "holdout.roc_auc",
        "holdout.log_loss",
        "holdout.brier",
        "holdout.accuracy",
        "baseline.holdout.roc_auc",
        "slice.region.north.roc_auc",
        "slice.segment.smb.rows",
        "time.search_s",
        "time.fit_final_s",
        "time.artifacts_s",
    ):
        assert name in p.metrics, name
    assert p.metrics["holdout.roc_auc"] == pytest.approx(out.holdout_metric)
    assert p.metrics["validation.roc_auc"] == pytest.approx(out.validation_metric)
    assert p.tags["flywheel.data_hash"] == "abc123" and p.tags["flywheel.feature_service"] == "churn_v1"
    assert p.tags["flywheel.git_sha"] and p.tags["hardware.cpu_count"] and p.tags["dataset"] == "churn"

    children = client.search_runs(
        [out.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{out.run_id}'", order_by=["tags.trial.number"]
    )
    assert len(children) == 4
    assert {c.data.params["family"] for c in children} == set(cfg.families)
    for c in children:
        assert c.info.status == "FINISHED"
        assert {"validation.roc_auc", "train.roc_auc", "fit_seconds"} <= set(c.data.metrics)
    best_child = max(children, key=lambda c: c.data.metrics["validation.roc_auc"])
    assert best_child.data.metrics["validation.roc_auc"] == pytest.approx(out.validation_metric)

    names = {a.path for a in client.list_artifacts(out.run_id)} | {
        a.path for a in client.list_artifacts(out.run_id, "plots")
    }
    assert {
        "split.json",
        "feature_importance.json",
        "sample_predictions.csv",
        "trials.csv",
        "baseline.json",
        "plots/confusion_matrix.png",
        "plots/roc.png",
        "plots/calibration.png",
        "plots/feature_importance.png",
    } <= names
    run_dir = artifacts / out.run_id / "artifacts"
    assert (run_dir / "plots" / "roc.png").stat().st_size > 1000
    summary = json.loads((run_dir / "split.json").read_text())
    assert summary["counts"] == split.counts()
    assert json.loads((run_dir / "baseline.json").read_text()) == out.baseline.summary()
    sample = pd.read_csv(run_dir / "sample_predictions.csv")
    assert len(sample) == 20 and sample["score"].between(0, 1).all()
    assert set(sample[dataset.entity]) <= set(split.holdout[dataset.entity])
    assert not Path("mlruns").exists() or not any(Path("mlruns").rglob(out.run_id))

    # same MLflow store (a fresh SQLite store costs ~10 s to create): reproducibility and failures
    _reproducible_and_failures_marked(split, dataset, mlflow_uri, tmp_path)


def _reproducible_and_failures_marked(split, dataset, mlflow_uri: str, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    cfg = TrainConfig(
        seed=1,
        families=["logistic_regression"],
        search=SearchConfig(method="bayesian", trials=2, metric="log_loss"),
        search_space={"logistic_regression": {"C": [0.01, 1.0]}},
    )
    gates = GatesConfig.model_validate({"baseline": {"kind": "shallow_tree"}})
    a = train_model.fn(split, dataset, cfg, gates, mlflow_uri, str(tmp_path / "a"), {})
    b = train_model.fn(split, dataset, cfg, gates, mlflow_uri, str(tmp_path / "a"), {})
    assert a.run_id != b.run_id and a.experiment_id == b.experiment_id
    assert (a.params, a.holdout_metrics, a.slice_metrics) == (b.params, b.holdout_metrics, b.slice_metrics)
    assert not a.greater_is_better and a.holdout_metric == a.holdout_metrics["log_loss"]
    assert (a.baseline.kind, a.baseline.feature) == ("shallow_tree", None)
    assert a.baseline_holdout_metric is not None and a.baseline_holdout_metric == b.baseline_holdout_metric

    client = MlflowClient(tracking_uri=mlflow_uri)
    hashes = [client.get_run(r.run_id).data.tags["flywheel.data_hash"] for r in (a, b)]
    assert hashes[0] == hashes[1]

    bad = cfg.model_copy(update={"search_space": {"logistic_regression": {"depth": [1]}}})
    with pytest.raises(Exception, match="no parameter"):
        train_model.fn(split, dataset, bad, gates, mlflow_uri, str(tmp_path / "a"), {})
    failed = client.search_runs([a.experiment_id], filter_string="attributes.status = 'FAILED'")
    assert len(failed) == 1
