"""The served predictor: one object per model version, the same in the gates, the service and batch scoring."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pytest

from flywheel.gates import evaluate_gates, request_rows
from flywheel.predictor import (
    PATHS,
    REPLAY_TOLERANCE,
    TAG_INFERENCE,
    build_predictor,
    probe_rows,
    served_predictor,
    tolerance,
)
from flywheel.schemas import DatasetDefinition, GatesConfig, load_dataset, load_gates
from flywheel.settings import ImputationConfig
from flywheel.training import build_baseline, build_pipeline, fit
from tests.conftest import PROJECT

FAMILIES = {
    "logistic_regression": {},
    "hist_gradient_boosting": {"max_iter": 30},
    "random_forest": {"n_estimators": 100, "max_depth": 8},
}


@pytest.fixture(scope="module")
def ds() -> DatasetDefinition:
    return load_dataset(PROJECT / "configs" / "datasets" / "churn.yaml")


@pytest.fixture(scope="module")
def frames(small_batches: list[pd.DataFrame]) -> tuple[pd.DataFrame, pd.DataFrame]:
    return pd.concat(small_batches[:8], ignore_index=True), pd.concat(small_batches[8:], ignore_index=True)


@pytest.fixture(scope="module")
def fitted(ds: DatasetDefinition, frames: tuple[pd.DataFrame, pd.DataFrame]) -> dict[str, Any]:
    train, _ = frames
    out = {f: fit(build_pipeline(f, p, ds, ImputationConfig(), 7), train, ds) for f, p in FAMILIES.items()}
    out["baseline"] = fit(build_baseline(ds), train, ds)
    return out


def _reference(pipeline: Any, frame: pd.DataFrame, ds: DatasetDefinition) -> np.ndarray:
    return pipeline.predict_proba(frame[ds.feature_names])[:, list(pipeline.classes_).index(1)]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_path_that_applies_matches_predict_proba_on_rows_and_frames(fitted, frames, ds, family):
    _, holdout = frames
    want = _reference(fitted[family], holdout, ds)
    for kind in PATHS:
        pred = build_predictor(fitted[family], ds, verify=holdout, paths=[kind])
        assert pred.kind == kind
        assert pred.verified_rows == len(holdout) + len(probe_rows(ds, ds.feature_names))
        assert pred.max_abs_diff <= tolerance(kind)
        np.testing.assert_allclose(pred.predict_frame(holdout), want, rtol=0, atol=tolerance(kind))
        # raw request rows (None for missing) give the frame's answers, through the same path
        rows = request_rows(holdout.head(50), pred.features)
        np.testing.assert_allclose(pred.predict_rows(rows), pred.predict_frame(holdout.head(50)), rtol=0, atol=1e-12)


def test_the_fastest_exact_path_is_chosen_and_a_layout_it_cannot_compile_falls_back(fitted, frames, ds):
    _, holdout = frames
    for family in FAMILIES:
        assert build_predictor(fitted[family], ds, verify=holdout).kind == "onnx", family
    # the passthrough prior-only baseline has nothing to compile or replay: the pipeline serves, and says why
    base = build_predictor(fitted["baseline"], ds, verify=holdout)
    assert base.kind == "pipeline"
    assert [f.split(":")[0] for f in base.fallbacks] == ["onnx", "replay"]


def test_a_path_that_differs_beyond_its_tolerance_is_not_used(fitted, frames, ds, monkeypatch):
    """Verification is what decides: a replay off by 1e-6 on one holdout row is refused (tolerance 1e-9)."""
    import flywheel.predictor as predictor

    _, holdout = frames
    real = predictor.ReplayPath.predict_proba
    n_probes = len(probe_rows(ds, ds.feature_names))

    def off_by_a_little(self: Any, columns: Any) -> np.ndarray:
        p = real(self, columns)
        if len(p) > n_probes:
            p[n_probes] += [-1e-6, 1e-6]  # the first holdout row (verification rows: probes, then holdout)
        return p

    monkeypatch.setattr(predictor.ReplayPath, "predict_proba", off_by_a_little)
    probes_only = build_predictor(fitted["logistic_regression"], ds, paths=["replay", "pipeline"])
    assert probes_only.kind == "replay", "without the holdout the drift on that row is not seen"
    checked = build_predictor(fitted["logistic_regression"], ds, verify=holdout, paths=["replay", "pipeline"])
    assert checked.kind == "pipeline"
    assert checked.fallbacks and f"> {REPLAY_TOLERANCE:g}" in checked.fallbacks[0]


def test_start_at_serves_the_path_the_gates_verified(fitted, ds):
    class Loaded:
        pipeline = fitted["hist_gradient_boosting"]
        tags = {TAG_INFERENCE: "replay"}

    assert served_predictor(Loaded(), ds).kind == "replay", "never a faster path than the gates timed"
    Loaded.tags = {}
    assert served_predictor(Loaded(), ds).kind == "onnx"


def _cheap_gates() -> GatesConfig:
    data = load_gates(PROJECT / "configs" / "gates.yaml").model_dump()
    data["latency"]["rows"] = 50
    data["primary"]["bootstrap"]["samples"] = 20
    return GatesConfig.model_validate(data)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_gate_report_and_service_name_the_same_inference_path(fitted, frames, ds, family):
    """The gate times the path the service will run; the service (make_slot, from the registered tag)
    reports the same one on /health."""
    from datetime import UTC, datetime

    from flywheel.serving import ModelSlot

    _, holdout = frames
    report = evaluate_gates(fitted[family], None, fitted["baseline"], holdout, ds, _cheap_gates(), 0.8, 0.8)
    rules = {r.rule: r for r in report.results}
    assert report.candidate_inference == "onnx"
    assert rules["latency"].detail.startswith(f"timed path: {report.candidate_inference} ")
    assert rules["inference"].detail.startswith(f"served through {report.candidate_inference} ")

    class Loaded:
        pipeline = fitted[family]
        tags = {TAG_INFERENCE: report.candidate_inference}

    slot = ModelSlot(arm="champion", name="churn", version="1", predictor=served_predictor(Loaded(), ds),
                     feature_service="churn_x", loaded_at=datetime.now(UTC))
    assert slot.describe()["inference"]["path"] == report.candidate_inference


def test_latency_gate_times_the_served_path_of_real_models(fitted, frames, ds):
    """Clearly separated cases only (no wall-clock threshold near a real figure): a 100-tree forest
    through the sklearn pipeline costs >= 10 ms of CPU per row, ~50x its ONNX path; the gate passes the
    compiled forest under the real 3 ms share and fails the same forest forced onto the pipeline path."""
    _, holdout = frames
    cfg = _cheap_gates()
    assert cfg.latency.model_share_ms == 3.0
    forest = fitted["random_forest"]
    compiled = build_predictor(forest, ds, verify=holdout)
    slow = build_predictor(forest, ds, paths=["pipeline"])
    fast_rule = {r.rule: r for r in evaluate_gates(compiled, None, fitted["baseline"], holdout, ds, cfg, 0.8, 0.8)
                 .results}["latency"]
    slow_rule = {r.rule: r for r in evaluate_gates(slow, None, fitted["baseline"], holdout, ds, cfg, 0.8, 0.8)
                 .results}["latency"]
    assert fast_rule.passed and "timed path: onnx" in fast_rule.detail
    assert not slow_rule.passed and "timed path: pipeline" in slow_rule.detail
