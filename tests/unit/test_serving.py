"""Serving logic without HTTP: routing, input checks, the one-row frame, explanations, the prediction log."""

from __future__ import annotations

import dataclasses
import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError

from flywheel.predictionlog import PredictionLog
from flywheel.predictor import PipelinePath, build_predictor, tolerance
from flywheel.serving import (
    Explainer,
    ModelSlot,
    RoutingPolicy,
    ServingState,
    Slots,
    _feature_owner,
    bucket,
    check_rows,
    routing_key,
)
from flywheel.settings import ImputationConfig
from flywheel.training import build_baseline, build_pipeline, fit, predict_scores
from tests.conftest import PROJECT

GOOD = {
    "tenure_months": 12, "monthly_charges": 70.5, "support_tickets_30d": 2, "avg_session_minutes": 45.0,
    "payment_delay_days": 3, "num_products": 2, "contract_type": "monthly", "payment_method": "card",
    "region": "north", "segment": "consumer",
}


@pytest.fixture(scope="module")
def frame(small_batches: list[pd.DataFrame]) -> pd.DataFrame:
    return pd.concat(small_batches[:4], ignore_index=True)


def _slot(pipeline: Any, dataset: Any, arm: str = "champion", version: str = "1") -> ModelSlot:
    return ModelSlot(
        arm=arm, name="churn", version=version, predictor=build_predictor(pipeline, dataset),
        feature_service="churn_x", loaded_at=datetime.now(UTC),
    )


def _broken(slot: ModelSlot) -> ModelSlot:
    """The slot with a model that raises on every call, behind the same predictor."""
    return dataclasses.replace(slot, predictor=dataclasses.replace(
        slot.predictor, path=PipelinePath(_Broken(), slot.features)))


@pytest.fixture(scope="module")
def churn() -> Any:
    from flywheel.schemas import load_dataset

    return load_dataset(PROJECT / "configs" / "datasets" / "churn.yaml")


@pytest.fixture(scope="module")
def fitted(churn: Any, frame: pd.DataFrame) -> dict[str, Any]:
    """Fitted once per module: the tests only read them."""
    out = {}
    for family in ("logistic_regression", "hist_gradient_boosting"):
        params = {"max_iter": 30} if family == "hist_gradient_boosting" else {}
        out[family] = fit(build_pipeline(family, params, churn, ImputationConfig(), 7), frame, churn)
    out["baseline"] = fit(build_baseline(churn), frame, churn)
    return out


# --------------------------------------------------------------------------------------------- routing


def test_bucket_is_stable_and_spreads_evenly() -> None:
    assert bucket("id:17") == bucket("id:17")
    values = [bucket(routing_key(i, None)) for i in range(20_000)]
    assert all(0 <= v < 1 for v in values)
    assert abs(np.mean([v < 0.3 for v in values]) - 0.3) < 0.02
    # rows without an id hash their content, key order aside
    assert routing_key(None, {"a": 1, "b": "x"}) == routing_key(None, {"b": "x", "a": 1})


def test_routing_policy_is_strict() -> None:
    assert RoutingPolicy().mode == "single"
    for bad in ({"mode": "canary", "share": 1.5}, {"mode": "split"}, {"mode": "single", "extra": 1},
                {"mode": "blue_green", "active": "blue"}):
        with pytest.raises(ValidationError):
            RoutingPolicy.model_validate(bad)


def test_route_per_mode(fitted: dict[str, Any], dataset: Any, settings: Any) -> None:
    state = ServingState(settings, dataset)
    champ = _slot(fitted["logistic_regression"], dataset)
    chall = _slot(fitted["hist_gradient_boosting"], dataset, "challenger", "2")
    both, alone = Slots(champ, chall), Slots(champ, None)
    keys = [routing_key(i, None) for i in range(2000)]
    assert {state._route(both, RoutingPolicy(), k) for k in keys} == {("champion", False)}
    canary = [state._route(both, RoutingPolicy(mode="canary", share=0.25), k)[0] for k in keys]
    assert abs(canary.count("challenger") / len(keys) - 0.25) < 0.04
    assert canary == [state._route(both, RoutingPolicy(mode="canary", share=0.25), k)[0] for k in keys]
    assert {state._route(both, RoutingPolicy(mode="blue_green", active="challenger"), k) for k in keys} == {
        ("challenger", False)}
    shadow = [state._route(both, RoutingPolicy(mode="shadow", share=0.5), k) for k in keys]
    assert {a for a, _ in shadow} == {"champion"} and 0.4 < np.mean([s for _, s in shadow]) < 0.6
    # without a challenger every mode falls back to the champion
    assert {state._route(alone, RoutingPolicy(mode="canary", share=1.0), k) for k in keys} == {("champion", False)}
    state.log.close()


@pytest.mark.parametrize("mode", ["refuse", "serve_loaded"])
def test_registry_outage_refuses_predictions_unless_configured_to_serve_loaded(
    fitted: dict[str, Any], dataset: Any, settings: Any, mode: str
) -> None:
    from flywheel.serving import Unavailable

    def unreachable() -> Any:
        raise ConnectionError("connection refused by 127.0.0.1:5432")

    cfg = settings.model_copy(update={"serve": settings.serve.model_copy(update={"on_registry_outage": mode})})
    state = ServingState(cfg, dataset, registry_factory=unreachable)
    state._slots = Slots(_slot(fitted["logistic_regression"], dataset), None)  # verified earlier, in memory
    assert state.reload()["error"].startswith("model registry unreachable: ConnectionError")
    assert not state.health()[0]
    if mode == "refuse":
        with pytest.raises(Unavailable, match=r"registry unreachable.*refused until it is back") as err:
            state.predict(None, [GOOD])
        assert err.value.status == 503
    else:
        assert state.predict(None, [GOOD]).results[0].version == "1"
    state.log.close()


class _Broken:
    """A model that raises on every call (a bad challenger, or a champion gone wrong)."""

    classes_ = np.array([0, 1])
    feature_names_in_ = None

    def predict_proba(self, frame: Any) -> np.ndarray:
        raise ValueError("matmul: shapes (1,10) and (3,) not aligned")


def test_a_failing_challenger_is_answered_by_the_champion_and_its_failures_logged(
    fitted: dict[str, Any], dataset: Any, settings: Any, tmp_path: Path
) -> None:
    from flywheel.serving import ModelFailure

    cfg = settings.model_copy(update={"serve": settings.serve.model_copy(
        update={"prediction_log_url": f"sqlite:///{tmp_path}/p.db"})})
    state = ServingState(cfg, dataset)
    events: list[tuple[str, str, str]] = []
    state.on_model_event = lambda *e: events.append(e)
    state.log.start()
    champ = _slot(fitted["logistic_regression"], dataset)
    broken = _broken(_slot(fitted["logistic_regression"], dataset, "challenger", "2"))
    state._slots, state._policy = Slots(champ, broken), RoutingPolicy(mode="canary", share=0.5)
    rows = [{**GOOD, "customer_id": i} for i in range(40)]
    out = state.predict(None, rows)
    assert {r.version for r in out.results} == {"1"}, "every row answered, by the champion"
    assert [r.probability for r in out.results] == [r.probability for r in state.predict(None, rows).results]
    assert state.log.flush()
    failed = state.log.failures()
    n_challenger = sum(bucket(routing_key(i, None)) < 0.5 for i in range(40))
    assert 0 < len(failed) == 2 * n_challenger, "each challenger row of both requests is logged as failed"
    assert {(f["version"], f["arm"]) for f in failed} == {("2", "challenger")}
    assert "ValueError: matmul" in failed[0]["error"] and events[0] == ("failed", "challenger", "2")
    assert len(state.log.rows(limit=100)) == 80, "the answered rows are logged as usual"
    # a champion that fails cannot be covered for: 500 naming the model, failures logged
    state._slots = Slots(_broken(champ), None)
    with pytest.raises(ModelFailure, match=r"model churn v1 failed to score: ValueError") as err:
        state.predict(None, rows[:3])
    assert err.value.status == 500
    assert state.log.flush() and len(state.log.failures()) == 2 * n_challenger + 3
    state.log.close()


def test_the_prediction_log_is_stamped_on_the_project_clock(
    fitted: dict[str, Any], dataset: Any, settings: Any, tmp_path: Path
) -> None:
    """The log's `at` (which monitoring windows and the outcome join read) is the project clock's time, for
    answered rows and failed ones alike: a simulated clock days ahead of the wall clock stamps its own time."""
    from datetime import timedelta

    from flywheel.clock import ManualClock

    cfg = settings.model_copy(update={"serve": settings.serve.model_copy(
        update={"prediction_log_url": f"sqlite:///{tmp_path}/p.db"})})
    clock = ManualClock(datetime(2031, 1, 1, 12, tzinfo=UTC))
    state = ServingState(cfg, dataset, clock=clock)
    state.log.start()
    champ = _slot(fitted["logistic_regression"], dataset)
    broken = _broken(_slot(fitted["logistic_regression"], dataset, "challenger", "2"))
    state._slots, state._policy = Slots(champ, broken), RoutingPolicy(mode="canary", share=0.5)
    rows = [{**GOOD, "customer_id": i} for i in range(20)]
    state.predict(None, rows)
    clock.advance(timedelta(hours=3))
    state.predict(None, rows)
    assert state.log.flush()
    stamps = sorted({r["at"].replace(tzinfo=UTC) for r in state.log.rows(limit=100)})
    assert stamps == [datetime(2031, 1, 1, 12, tzinfo=UTC), datetime(2031, 1, 1, 15, tzinfo=UTC)], stamps
    failed = {f["at"].replace(tzinfo=UTC) for f in state.log.failures()}
    assert failed == set(stamps), "the challenger's failures carry the same clock's time"
    state.log.close()


# ---------------------------------------------------------------------------------------- input checks


def test_check_rows_accepts_a_good_row_and_nulls_of_nullable_features(dataset: Any) -> None:
    assert check_rows([GOOD, {**GOOD, "avg_session_minutes": None, "customer_id": 5}], dataset) == []
    named = [{**GOOD, "event_timestamp": "2026-03-01T00:00:00Z"}, {**GOOD, "event_timestamp": None}]
    assert check_rows(named, dataset) == [], "a raw row may name its feature snapshot (or send null)"


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"region": "__drop__"}, "missing feature(s) ['region']"),
        ({"shoe_size": 44}, "unknown feature(s) ['shoe_size']"),
        ({"tenure_months": "ten"}, "tenure_months: expected a number"),
        ({"tenure_months": True}, "tenure_months: expected a number"),
        ({"tenure_months": 2.5}, "tenure_months: expected an integer"),
        ({"monthly_charges": math.nan}, "monthly_charges: must be a finite number"),
        ({"monthly_charges": math.inf}, "monthly_charges: must be a finite number"),
        ({"monthly_charges": -3}, "below the minimum"),
        ({"contract_type": 3}, "contract_type: expected a string"),
        ({"contract_type": "weekly"}, "'weekly' is not one of"),
        ({"region": None}, "region: may not be null"),
        ({"customer_id": "abc"}, "customer_id: expected an integer id"),
        # a JSON integer of hundreds of digits: math.isfinite raised OverflowError (a 500) before
        ({"monthly_charges": 10**400}, "monthly_charges: is too large a number (401 digits)"),
        ({"tenure_months": -(10**320)}, "tenure_months: is too large a number (321 digits)"),
        ({"payment_delay_days": 10**300}, "payment_delay_days: 1e+300 is above the maximum 365"),
        ({"customer_id": 10**500}, "customer_id: id of 501 digits is outside the 64-bit integer range"),
        ({"event_timestamp": "2026-03-01"}, "event_timestamp: '2026-03-01' has no UTC offset"),
        ({"event_timestamp": 1772323200}, "event_timestamp: expected an ISO 8601 time"),
        ({"event_timestamp": "yesterday"}, "'yesterday' is not an ISO 8601 time"),
    ],
)
def test_check_rows_names_what_is_wrong(dataset: Any, change: dict[str, Any], needle: str) -> None:
    row = {**GOOD, **change}
    row = {k: v for k, v in row.items() if v != "__drop__"}
    problems = check_rows([GOOD, row], dataset)
    assert len(problems) == 1 and problems[0].startswith("rows[1]") and needle in problems[0], problems


# ----------------------------------------------------------------------------------- frame and predict


def test_slot_frame_matches_the_training_frame_predictions(
    fitted: dict[str, Any], dataset: Any, frame: pd.DataFrame
) -> None:
    pipe = fitted["hist_gradient_boosting"]
    slot = _slot(pipe, dataset)
    sample = frame.head(50)
    records = sample[dataset.feature_names].to_dict("records")
    rows = [{f: (None if pd.isna(v) else v) for f, v in r.items()} for r in records]
    built = slot.frame(rows)
    assert list(built.columns) == dataset.feature_names
    assert built["tenure_months"].dtype == np.float64 and built["contract_type"].dtype == object
    assert slot.predictor.kind == "onnx"
    np.testing.assert_allclose(slot.probabilities(rows), predict_scores(pipe, sample, dataset), rtol=0,
                               atol=tolerance(slot.predictor.kind))
    pipeline_path = build_predictor(pipe, dataset, paths=["pipeline"])
    np.testing.assert_array_equal(pipeline_path.predict_rows(rows), predict_scores(pipe, sample, dataset))
    # a row with every feature missing is still scored (the pipeline imputes)
    assert 0 <= slot.probabilities([{}])[0] <= 1


def test_feature_owner_folds_one_hot_columns_back(fitted: dict[str, Any], dataset: Any) -> None:
    pre = fitted["logistic_regression"].steps[0][1]
    owner = _feature_owner(pre, dataset.feature_names)
    assert owner is not None and len(owner) == pre.transform(_slot(fitted["logistic_regression"], dataset).frame(
        [GOOD])).shape[1]
    names = np.array(dataset.feature_names)[owner]
    assert set(names) == set(dataset.feature_names)
    assert (names == "contract_type").sum() == 3  # monthly, annual, two_year


# -------------------------------------------------------------------------------------- explanations


def test_linear_explanations_are_shap_additive_on_raw_features(fitted: dict[str, Any], dataset: Any) -> None:
    slot = _slot(fitted["logistic_regression"], dataset)
    ex = Explainer(slot)
    assert (ex.method, ex.unit) == ("shap_linear", "log_odds")
    rows = [GOOD, {**GOOD, "support_tickets_30d": 9, "payment_method": None}]
    proba = slot.probabilities(rows)
    for row, p, out in zip(rows, proba, ex.explain(rows, proba), strict=True):
        names = [c["feature"] for c in out["contributions"]]
        assert sorted(names) == sorted(dataset.feature_names)
        total = out["base_value"] + sum(c["contribution"] for c in out["contributions"])
        assert total == pytest.approx(math.log(p / (1 - p)), abs=1e-6)
        assert out["contributions"][0]["value"] == row[names[0]]


def test_tree_explanations_use_tree_shap(fitted: dict[str, Any], dataset: Any) -> None:
    slot = _slot(fitted["hist_gradient_boosting"], dataset)
    ex = Explainer(slot)
    assert ex.method == "shap_tree"
    proba = slot.probabilities([GOOD])
    (out,) = ex.explain([GOOD], proba)
    assert {c["feature"] for c in out["contributions"]} <= set(dataset.feature_names)
    total = out["base_value"] + sum(c["contribution"] for c in out["contributions"])
    assert total == pytest.approx(math.log(proba[0] / (1 - proba[0])), abs=1e-4)


def test_other_models_fall_back_to_occlusion(fitted: dict[str, Any], dataset: Any) -> None:
    slot = _slot(fitted["baseline"], dataset)
    ex = Explainer(slot)
    assert (ex.method, ex.unit) == ("occlusion", "probability")
    (out,) = ex.explain([GOOD], slot.probabilities([GOOD]))
    # a prior-only model: no feature changes the probability
    assert all(c["contribution"] == 0 for c in out["contributions"])


# ------------------------------------------------------------------------------------- prediction log


def _record(i: int, **kw: Any) -> dict[str, Any]:
    return {"at": datetime.now(UTC), "request_id": f"r{i}", "entity": i, "model": "churn", "version": "1",
            "arm": "champion", "prediction": False, "probability": 0.25, "latency_ms": 1.5,
            "features": {"x": np.float64(1.5), "c": None}, "imputed": ["c"], "explanation": None, **kw}


def test_prediction_log_writes_in_background_and_flushes_on_close(tmp_path: Path) -> None:
    log = PredictionLog(f"sqlite:///{tmp_path}/p.db", flush_seconds=60)
    log.start()
    for i in range(25):
        log.append_many([_record(i, shadow=i % 5 == 0, explanation={"method": "occlusion"} if i == 3 else None)])
    assert log.rows() == [], "nothing written before the flush interval"
    log.close()
    again = PredictionLog(f"sqlite:///{tmp_path}/p.db")
    rows = again.rows()
    assert len(rows) == 25 and [r["entity"] for r in rows] == [str(i) for i in range(25)]
    assert rows[0]["features"] == {"x": 1.5, "c": None} and rows[0]["imputed"] == ["c"]
    assert rows[3]["explanation"] == {"method": "occlusion"} and sum(r["shadow"] for r in rows) == 5
    again.close()


def test_prediction_log_survives_its_writer_dying_and_flush_waits_for_the_database(tmp_path: Path) -> None:
    import os
    import signal

    log = PredictionLog(f"sqlite:///{tmp_path}/p.db", flush_seconds=60)
    log.start()
    first = log.writer_pid
    log.append_many([_record(i) for i in range(10)])
    assert log.flush() and len(log.rows()) == 10 and log.written == 10, "flush() returns once rows are stored"
    assert first is not None and first != os.getpid(), "rows are written by a separate process"
    os.kill(first, signal.SIGKILL)
    deadline = __import__("time").monotonic() + 10
    while log.last_error is None and __import__("time").monotonic() < deadline:
        __import__("time").sleep(0.05)
    assert log.last_error and str(first) in log.last_error, "a dead writer is reported"
    log.append_many([_record(i) for i in range(10, 15)])
    assert log.flush(), "the next send restarts the writer"
    assert log.restarts == 1 and log.writer_pid != first
    assert [r["entity"] for r in log.rows()] == [str(i) for i in range(15)] and log.written == 15
    log.close()


def test_prediction_log_writer_stores_what_it_holds_when_the_service_dies(tmp_path: Path) -> None:
    import subprocess
    import sys

    # a "service" that queues rows and dies without close(): the writer reads end-of-file and flushes
    script = (
        "import os, time; from datetime import UTC, datetime\n"
        "from flywheel.predictionlog import PredictionLog\n"
        f"log = PredictionLog('sqlite:///{tmp_path}/p.db', flush_seconds=60); log.start()\n"
        "log.append_many([{'at': datetime.now(UTC), 'request_id': 'r', 'entity': i, 'model': 'm', 'version': '1',"
        " 'arm': 'champion', 'prediction': True, 'probability': 0.9, 'latency_ms': 1.0, 'features': {},"
        " 'imputed': []} for i in range(7)])\n"
        "time.sleep(1.0); print(log.writer_pid, flush=True); os._exit(9)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=PROJECT)
    assert done.returncode == 9, done.stderr
    writer = int(done.stdout.split()[0])
    deadline = __import__("time").monotonic() + 20
    while Path(f"/proc/{writer}").exists() and __import__("time").monotonic() < deadline:
        __import__("time").sleep(0.1)
    assert not Path(f"/proc/{writer}").exists(), "the orphaned writer exits by itself"
    again = PredictionLog(f"sqlite:///{tmp_path}/p.db")
    assert len(again.rows()) == 7, "rows queued before the service died are stored"
    again.close()


def test_prediction_log_writer_keeps_failed_batches_and_bounds_what_it_holds(tmp_path: Path) -> None:
    from flywheel.predictionlog import Writer

    writer = Writer(f"sqlite:///{tmp_path}/p.db", max_pending=5)
    writer.add([_record(i) for i in range(8)])
    assert writer.dropped == 3 and len(writer.pending) == 5, "the oldest rows beyond max_pending are dropped"
    import sqlite3

    def rename(a: str, b: str) -> None:  # a table that is gone makes the insert fail (root ignores chmod)
        with sqlite3.connect(tmp_path / "p.db") as db:
            db.execute(f"ALTER TABLE {a} RENAME TO {b}")

    writer.engine.dispose()
    rename("flywheel_predictions", "elsewhere")
    assert writer.flush() == 0 and writer.last_error and len(writer.pending) == 5, "kept for the next flush"
    writer.engine.dispose()
    rename("elsewhere", "flywheel_predictions")
    assert writer.flush() == 5 and writer.last_error is None and writer.written == 5
    writer.engine.dispose()


def test_routing_policy_round_trips_through_the_log_database(tmp_path: Path) -> None:
    log = PredictionLog(f"sqlite:///{tmp_path}/p.db")
    assert log.load_policy("churn") is None
    log.save_policy("churn", {"mode": "canary", "share": 0.1, "active": "champion"}, "admin")
    log.save_policy("churn", {"mode": "blue_green", "share": 0.0, "active": "challenger"}, "admin")
    assert RoutingPolicy.model_validate(log.load_policy("churn")).active == "challenger"
    log.close()
