"""The monitoring flow on a real champion (training flow, MLflow on SQLite) and a real prediction log:
served windows read from the log, judged against the stored reference profile, recorded in the history,
the drift alarm raised only after the policy's persistence, and calm traffic raising none. The alarm fires
one retrain decision (its event read back from the Prefect test server); the next drifted window inside
the cooldown is suppressed and recorded."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import make_home

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SERVED = datetime(2030, 1, 1, tzinfo=UTC)  # served windows start here, hour by hour
WINDOW_ROWS = 800  # above the policy's minimum sample per window


def champion_home(tmp_path_factory: pytest.TempPathFactory, name: str) -> Path:
    """A home whose champion the real training flow trained on 15 drift-free days (needs the Prefect harness)."""
    import shutil

    from flows.training import TrainingParams, training_pipeline
    from flywheel.datagen import GeneratorSpec, write_batches

    home = make_home(tmp_path_factory.mktemp(name))
    files = write_batches(GeneratorSpec(seed=21, days=15, rows_per_day=600, customers=6000), home / "data" / "staging")
    incoming = home / "data" / "incoming" / "churn"
    incoming.mkdir(parents=True, exist_ok=True)
    for f in files:
        shutil.copy2(f, incoming / f.name)
    result = training_pipeline(TrainingParams(profile="ci", config_dir=str(home / "configs")))
    assert result.alias == "champion", result
    return home


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory, prefect_harness: None) -> Path:
    return champion_home(tmp_path_factory, "monitoring")


def _settings(home: Path):
    from flywheel.settings import load_settings

    return load_settings(profile="ci", config_dir=home / "configs", environ={})


def _serve(home: Path, hour: int, covariate_drift: float, seed: int, snapshots: bool = False) -> pd.DataFrame:
    """Log one hour of the champion's answers on generated rows, as the service's writer stores them. With
    `snapshots`, each answer records its feature snapshot (entity = the row's customer, feature_time = its
    event time), as entity requests do, so outcomes can join it. The served rows (with their labels)."""
    from flywheel.audit import AuditLog
    from flywheel.datagen import DriftSpec, GeneratorSpec, generate
    from flywheel.predictionlog import Writer
    from flywheel.predictor import served_predictor
    from flywheel.registry import Registry
    from flywheel.schemas import load_dataset

    settings = _settings(home)
    dataset = load_dataset(settings.resolve(settings.dataset))
    spec = GeneratorSpec(seed=seed, days=1, rows_per_day=WINDOW_ROWS, drift=DriftSpec(covariate=covariate_drift))
    (_, rows), = list(generate(spec))
    loaded = Registry(settings.mlflow_tracking_uri, AuditLog(settings.audit_db_url)).load("churn", alias="champion")
    p = served_predictor(loaded, dataset).predict_frame(rows)
    at = SERVED + timedelta(hours=hour)
    records = []
    for i, (row, prob) in enumerate(zip(rows[dataset.feature_names].to_dict("records"), p, strict=True)):
        features = {k: (None if pd.isna(v) else v) for k, v in row.items()}
        records.append({"at": at + timedelta(seconds=i), "request_id": uuid.uuid4().hex,
                        "entity": str(rows[dataset.entity].iloc[i]) if snapshots else str(i),
                        "model": "churn", "version": str(loaded.version), "arm": "champion",
                        "prediction": bool(prob >= 0.5), "probability": float(prob), "latency_ms": 1.0,
                        "features": json.loads(json.dumps(features)), "imputed": [], "explanation": None,
                        "shadow": False,
                        "feature_time": rows[dataset.timestamp].iloc[i].to_pydatetime() if snapshots else None})
    writer = Writer(settings.store_url(settings.serve.prediction_log_url))
    writer.add(records)
    assert writer.flush() == len(records)
    writer.engine.dispose()
    return rows.assign(_p=p, _at=[r["at"] for r in records])


def _monitor(home: Path, hour: int):
    from flows.monitoring import MonitoringParams, monitoring

    end = SERVED + timedelta(hours=hour + 1)
    return monitoring(MonitoringParams(profile="ci", config_dir=str(home / "configs"), end=end, report=hour == 0))


def test_calm_traffic_raises_nothing_and_drift_alarms_after_persistence(home: Path) -> None:
    from flywheel.monitoring.history import MonitoringHistory

    started = datetime.now(UTC)
    _serve(home, 0, covariate_drift=0.0, seed=101)
    calm = _monitor(home, 0)
    assert (calm.rows, calm.version, calm.alarm, calm.data_quality_alarm) == (WINDOW_ROWS, "1", False, False), calm
    assert calm.report and Path(calm.report).is_file(), "the window's Evidently report"
    assert calm.estimated_roc_auc is not None and 0.5 < calm.estimated_roc_auc < 1.0

    for hour in (1, 2):
        _serve(home, hour, covariate_drift=1.0, seed=200 + hour)
    first, second = _monitor(home, 1), _monitor(home, 2)
    assert first.status == "drift" and not first.alarm, "one drifted window is not an alarm (persistence 2)"
    assert second.status == "drift" and second.alarm, second
    assert second.drifted_features, second
    assert [d.split(" (")[0] for d in calm.decisions] == [
        "drift_detected: suppressed", "performance_degraded: suppressed", "volume_reached: suppressed",
        "model_stale: suppressed"]
    assert "too few rows: 0 new labelled rows since" in calm.decisions[2], calm.decisions
    assert "below threshold: champion v1 is" in calm.decisions[3], calm.decisions
    assert calm.liveness_alarms == [], "monitoring and outcomes are within their silences of the champion's start"
    assert first.decisions[0].startswith("drift_detected: suppressed"), first.decisions
    # each window is an MLflow run of its own: key numbers as metrics, the Evidently report as an artifact
    from mlflow import MlflowClient

    uri = _settings(home).mlflow_tracking_uri
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    run = client.get_run(second.mlflow_run)
    assert run.data.metrics["drift_alarm"] == 1 and run.data.metrics["rows"] == WINDOW_ROWS, run.data.metrics
    assert run.data.metrics["share_drifted"] > 0 and "estimated_roc_auc" in run.data.metrics
    assert any(k.startswith("drift.") for k in run.data.metrics) and run.data.tags["flywheel.version"] == "1"
    assert client.list_artifacts(second.mlflow_run) == [], "no report asked for that window (report=False)"
    assert client.get_run(calm.mlflow_run).data.metrics["drift_alarm"] == 0
    assert [a.path for a in client.list_artifacts(calm.mlflow_run)] == ["report"]
    assert second.decisions[0].startswith("drift_detected: fire"), second.decisions

    _serve(home, 3, covariate_drift=1.0, seed=203)
    third = _monitor(home, 3)
    assert third.alarm and third.decisions[0].startswith("drift_detected: suppressed (cooldown"), third.decisions
    fired = _retrain_events(started)
    assert len(fired) == 1 and fired[0]["resource"]["prefect.resource.id"] == "flywheel.model.churn", fired

    history = MonitoringHistory(_settings(home).audit_db_url)
    try:
        recorded = history.previous("churn", "v1", before=SERVED + timedelta(hours=10))
    finally:
        history.close()
    assert [(r.status, r.alarm) for r in recorded] == [
        ("ok", False), ("drift", False), ("drift", True), ("drift", True)]


def _retrain_events(since: datetime) -> list[dict]:
    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventNameFilter

    with get_client(sync_client=True) as client:
        events = client.read_events(filter=EventFilter(event=EventNameFilter(name=["flywheel.retrain.requested"])),
                                    limit=50).events
    # the session's Prefect server also holds other tests' events (other models, earlier tests)
    return [e.model_dump(mode="json") for e in events
            if e.resource.id == "flywheel.model.churn" and e.occurred >= since]


def test_an_empty_window_is_too_few_rows_never_an_alarm(home: Path) -> None:
    result = _monitor(home, 50)  # nothing was served then
    assert (result.rows, result.status, result.alarm) == (0, "too_few_rows", False), result


def _land_outcomes(home: Path, rows: pd.DataFrame, arrived: datetime) -> None:
    """The served rows' labels as one outcome batch that arrived at `arrived` (stored as the ingest does)."""
    from flywheel.outcomes import OutcomeStore, outcome_rows
    from flywheel.schemas import load_dataset

    settings = _settings(home)
    dataset = load_dataset(settings.resolve(settings.dataset))
    batch = rows[[dataset.entity, dataset.timestamp, dataset.label]].assign(
        **{dataset.label_timestamp: pd.Timestamp(arrived)})
    store = OutcomeStore(settings.audit_db_url)
    try:
        assert store.ingest(outcome_rows(batch, dataset), dataset, source="test").rows == len(batch)
    finally:
        store.close()


def test_late_outcomes_fill_in_the_realized_metric_beside_the_estimate(home: Path) -> None:
    """Window 20 is served with recorded snapshots; its labels land an hour after it. The next run (window
    21) fills in window 20's realized ROC AUC and accuracy beside the estimate on the same rows. Labels of
    100 of its rows were already known before they were predicted (then delivered again): never used."""
    import numpy as np

    from flywheel.monitoring.performance import estimate_performance, realized_performance
    from flywheel.monitoring.realized import PerformanceHistory
    from flywheel.trigger_decisions import TriggerDecisions

    served = _serve(home, 20, covariate_drift=0.0, seed=320, snapshots=True)
    judged = _monitor(home, 20)
    assert judged.rows == WINDOW_ROWS and judged.realized_roc_auc is None and judged.estimated_roc_auc, judged
    assert not [r for r in judged.realized if ":2030-01-01T20:00:00+00:00/" in r], "no outcome has arrived yet"

    known_early, late = served.iloc[:100], served.iloc[100:]
    _land_outcomes(home, known_early, SERVED + timedelta(hours=19))  # before the predictions were made
    _land_outcomes(home, served, SERVED + timedelta(hours=21, minutes=30))  # every label, after the window
    assert late["_at"].max() < SERVED + timedelta(hours=21, minutes=30)

    later = _monitor(home, 21)  # nothing served in hour 21: the run still fills in window 20
    filled = [r for r in later.realized if ":2030-01-01T20:00:00+00:00/" in r]
    assert len(filled) == 1 and "ROC AUC realized" in filled[0], later.realized

    settings = _settings(home)
    history = PerformanceHistory(settings.audit_db_url)
    try:
        (rec,) = [e for e in history.evaluations("churn", "v1") if e.window_start == SERVED + timedelta(hours=20)]
    finally:
        history.close()
    y = (late["churned"] == "yes").to_numpy(int)
    p = late["_p"].to_numpy(float)
    truth, est = realized_performance(y, p), estimate_performance(p, 200, 0.95, 42)
    assert (rec.scored_rows, rec.labelled_rows) == (WINDOW_ROWS, WINDOW_ROWS - 100), rec
    assert rec.realized_roc_auc == pytest.approx(truth.roc_auc) and rec.realized_accuracy == pytest.approx(
        truth.accuracy), (rec, truth)
    assert rec.estimated_roc_auc == pytest.approx(est.roc_auc.value), "the estimate on the same labelled rows"
    assert rec.roc_auc_error == pytest.approx(est.roc_auc.value - truth.roc_auc)
    assert np.isclose(rec.accuracy_error, est.accuracy.value - truth.accuracy)

    # the realized figure was judged by the performance rule, on the window's own event id
    store = TriggerDecisions(settings.audit_db_url)
    try:
        decided = [d for d in store.decisions("churn", limit=200)
                   if d.kind == "performance_degraded" and d.event_id == f"performance:{rec.key}"]
    finally:
        store.dispose()
    assert [d.evidence["source"] for d in decided] == ["realized", "estimated"] or \
        [d.evidence["source"] for d in decided] == ["estimated", "realized"], decided

    again = _monitor(home, 22)  # no new outcome: nothing is evaluated again, nothing appended
    assert not [r for r in again.realized if ":2030-01-01T20:00:00+00:00/" in r], again.realized
