"""Announced batches acted on, end to end against a real Prefect server (the session's test harness) with the
`ingest` and `outcomes` deployments registered as `flywheel up` registers them: a signed POST
/hooks/data-landed starts one `ingest` run that validates, ingests and materializes the batch and lets
the volume trigger decide; /hooks/labels-landed starts one `outcomes` run that stores the outcomes; a
batch that fails validation is quarantined by its run and nothing is ingested; hostile or repeated
deliveries start nothing."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from flywheel.datagen import GeneratorSpec, write_batches, write_label_batches
from flywheel.settings import Settings, load_settings
from tests.conftest import make_home
from tests.integration.test_webhook import Running, serve

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.usefixtures("prefect_harness")]
SPEC = GeneratorSpec(seed=11, days=2, rows_per_day=150, customers=400)


@pytest.fixture(scope="module")
def model() -> str:
    return f"landing{uuid.uuid4().hex[:8]}"  # the harness's server outlives this module


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = make_home(tmp_path_factory.mktemp("landing"))
    write_batches(SPEC, home / "data" / "incoming" / "churn")
    write_label_batches(SPEC, home / "data" / "incoming" / "churn_labels")
    return home


@pytest.fixture(scope="module")
def settings(home: Path, model: str) -> Settings:
    return load_settings("ci", home / "configs", environ={"FLYWHEEL_REGISTER__MODEL_NAME": model})


@pytest.fixture(scope="module")
def served(home: Path, model: str, prefect_harness: None) -> Iterator[str]:
    """The `ingest` and `outcomes` deployments registered on the harness's server exactly as `flywheel up`
    registers them (flows/serve_deployments.py `build_deployments`: prefect.yaml's triggers, parameters,
    concurrency), their automations live. The runs their triggers create are executed in this process
    (`_execute`), not by a served runner: a runner starts a fresh process per run, importing Great
    Expectations, Feast and MLflow each time (minutes on a busy 2-core machine)."""
    from prefect.settings import PREFECT_API_URL

    from flows.serve_deployments import build_deployments

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FLYWHEEL_REGISTER__MODEL_NAME", model)  # the runs' settings: this module's own model
        settings = load_settings("ci", home / "configs", environ={"FLYWHEEL_REGISTER__MODEL_NAME": model})
        for dep in build_deployments(settings, "ci", str(home / "configs")):
            if dep.name in ("ingest", "outcomes"):
                dep.apply()
        time.sleep(2)  # the triggers service loads the new automations
        yield str(PREFECT_API_URL.value())


def _execute(run_id: str):
    """Run the flow run a deployment's trigger created, as the served runner would."""
    from prefect.client.orchestration import get_client
    from prefect.flow_engine import run_flow

    from flows.ingestion import data_landed, labels_landed

    with get_client(sync_client=True) as client:
        run = client.read_flow_run(uuid.UUID(run_id))
        deployment = client.read_deployment(run.deployment_id)
    flow = {"ingest": data_landed, "outcomes": labels_landed}[deployment.name]
    return run, run_flow(flow, flow_run=run, parameters=run.parameters, return_type="state")


@pytest.fixture(scope="module")
def receiver(settings: Settings, served: str, model: str) -> Iterator[Running]:
    running = serve(settings, served, model)
    yield running
    running.stop()


def _run_of(event_id: str, wait_s: float = 60) -> str:
    from tasks.triggers import started_run

    deadline = time.monotonic() + wait_s
    while (run_id := started_run(event_id)) is None:
        assert time.monotonic() < deadline, f"no run started by event {event_id} within {wait_s} s"
        time.sleep(0.5)
    return run_id


def _runs_of(deployment: str) -> int:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    with get_client(sync_client=True) as client:
        return len(client.read_flow_runs(deployment_filter=DeploymentFilter(
            name=DeploymentFilterName(any_=[deployment]))))


def _volume_decisions(settings: Settings, model: str) -> list:
    from flywheel.trigger_decisions import TriggerDecisions

    store = TriggerDecisions(settings.audit_db_url)
    try:
        return [d for d in reversed(store.decisions(model)) if d.kind == "volume_reached"]
    finally:
        store.dispose()


def test_a_landed_batch_is_validated_ingested_materialized_then_the_volume_trigger_decides(
    receiver: Running, settings: Settings, model: str
) -> None:
    from flywheel.featurestore import ingested_batches
    from flywheel.schemas import load_dataset

    dataset = load_dataset(settings.resolve(settings.dataset))
    offline = settings.resolve(settings.paths.offline_dir)
    before = _runs_of("ingest")
    resp = receiver.post("data-landed", {"dataset": "churn", "uri": "batch_2026-01-01.parquet", "rows": 150},
                         "land-1")
    assert resp.status_code == 202, resp.text
    run, state = _execute(_run_of(resp.json()["event_id"]))
    assert state.is_completed(), state
    assert run.parameters["params"]["batch"] == str(settings.resolve("data/incoming/churn/batch_2026-01-01.parquet"))
    assert run.parameters["params"]["delivery"] == "land-1"

    ledger = ingested_batches(dataset, offline)
    assert list(ledger) == ["batch_2026-01-01"] and ledger["batch_2026-01-01"]["feature_rows"] == 150
    assert "materialized_at" in ledger["batch_2026-01-01"], "the batch reached the online store"
    (decision,) = _volume_decisions(settings, model)
    assert (decision.outcome, decision.suppressed_by) == ("suppressed", "too_few_rows"), decision.reason
    assert decision.evidence["new_labelled_rows"] == 150 and "150 new labelled rows" in decision.reason

    # a repeat of the delivery, a file outside the incoming folder, a file that is not there: nothing starts
    assert receiver.post("data-landed", {"dataset": "churn", "uri": "batch_2026-01-01.parquet", "rows": 150},
                         "land-1").status_code == 200
    outside = receiver.post("data-landed", {"dataset": "churn", "uri": "../churn_labels/labels_2026-01-31.parquet"},
                            "land-2")
    assert outside.status_code == 422 and "outside the incoming folder" in outside.json()["detail"], outside.text
    missing = receiver.post("data-landed", {"dataset": "churn", "uri": "batch_2030-01-01.parquet"}, "land-3")
    assert missing.status_code == 422 and "no such file" in missing.json()["detail"]
    time.sleep(3)  # a run, had any event gone out, would have been created by now
    assert _runs_of("ingest") == before + 1


def test_a_landed_batch_that_fails_validation_is_quarantined_and_nothing_is_ingested(
    receiver: Running, settings: Settings
) -> None:
    from flywheel.featurestore import ingested_batches
    from flywheel.schemas import load_dataset

    bad = settings.resolve("data/incoming/churn/batch_2026-02-01.parquet")
    bad.write_bytes(b"PAR1 this is not parquet")
    resp = receiver.post("data-landed", {"dataset": "churn", "uri": bad.name}, "land-bad")
    assert resp.status_code == 202, resp.text  # the receiver never reads a batch: its run does
    _, state = _execute(_run_of(resp.json()["event_id"]))
    assert state.is_failed() and "batch_2026-02-01.parquet" in (state.message or ""), state
    assert not bad.exists() and any(settings.resolve(settings.paths.quarantine_dir).rglob("batch_2026-02-01*"))
    dataset = load_dataset(settings.resolve(settings.dataset))
    assert "batch_2026-02-01" not in ingested_batches(dataset, settings.resolve(settings.paths.offline_dir))


def test_landed_labels_are_stored_as_outcomes_then_the_volume_trigger_decides(
    receiver: Running, settings: Settings, model: str
) -> None:
    from flywheel.outcomes import OutcomeStore

    labels = sorted(settings.resolve("data/incoming/churn_labels").glob("labels_*.parquet"))[0]
    resp = receiver.post("labels-landed", {"dataset": "churn", "uri": labels.name}, "labels-1")
    assert resp.status_code == 202, resp.text
    _, state = _execute(_run_of(resp.json()["event_id"]))
    assert state.is_completed(), state
    store = OutcomeStore(settings.audit_db_url)
    try:
        stored = store.count("churn")
    finally:
        store.close()
    import pandas as pd

    assert stored == len(pd.read_parquet(labels)) > 0
    latest = _volume_decisions(settings, model)[-1]
    assert latest.evidence["new_labelled_rows"] >= stored and latest.suppressed_by == "too_few_rows"


def test_the_materialization_flow_loads_what_the_online_store_has_not_seen(settings: Settings, served: str,
                                                                           tmp_path: Path) -> None:
    """A batch ingested offline only (as a replay or a late batch would be) is loaded by the `materialization`
    flow; a home with nothing ingested is a no-op, not a failure."""
    from flows.materialization import MaterializationParams, materialization
    from flywheel.featurestore import ingest_batch, ingested_batches
    from flywheel.schemas import load_dataset
    from flywheel.validation import read_batch

    dataset = load_dataset(settings.resolve(settings.dataset))
    offline = settings.resolve(settings.paths.offline_dir)
    batch = settings.resolve("data/incoming/churn/batch_2026-01-02.parquet")
    ingest_batch(read_batch(batch, dataset), dataset, offline, "batch_2026-01-02")
    assert "materialized_at" not in ingested_batches(dataset, offline)["batch_2026-01-02"]
    report = materialization(MaterializationParams(profile="ci", config_dir=str(settings.paths.home / "configs")))
    assert "materialized_at" in ingested_batches(dataset, offline)["batch_2026-01-02"]
    assert [load.mode for load in report.loads] and {load.mode for load in report.loads} <= {"incremental", "full"}

    empty = make_home(tmp_path)
    nothing = materialization(MaterializationParams(profile="ci", config_dir=str(empty / "configs")))
    assert nothing.loads == [] and nothing.dataset == "churn"
