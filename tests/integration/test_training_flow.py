"""The training pipeline end to end on real Prefect (test harness), MLflow (SQLite), Feast and GX.

One project home is shared by the scenario, in order: a first champion, a better candidate that
becomes challenger, a sabotaged candidate that is rejected, a bad batch that is quarantined, and a
reproduction of the champion from its lineage.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest
from mlflow import MlflowClient

from flywheel.audit import AuditLog
from flywheel.datagen import FaultSpec, GeneratorSpec, write_batches
from flywheel.registry import Registry
from flywheel.runtime import start_run_context
from tests.conftest import make_home

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.usefixtures("prefect_harness")]

SPEC = GeneratorSpec(seed=11, days=28, rows_per_day=500, customers=6000)


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> dict:
    home = make_home(tmp_path_factory.mktemp("home"))
    staging = home / "data" / "staging"
    files = write_batches(SPEC, staging)
    return {"home": home, "staging": files, "incoming": home / "data" / "incoming" / "churn", "results": {}}


def _arrive(scenario: dict, files: list[Path]) -> None:
    scenario["incoming"].mkdir(parents=True, exist_ok=True)
    for f in files:
        shutil.copy2(f, scenario["incoming"] / f.name)


def _run(scenario: dict, **kwargs):
    from flows.training import TrainingParams, training_pipeline

    params = TrainingParams(profile="ci", config_dir=str(scenario["home"] / "configs"), **kwargs)
    return training_pipeline(params, return_state=True)


def _registry(scenario: dict) -> tuple[Registry, str]:
    ctx = start_run_context("ci", scenario["home"] / "configs")
    return Registry(ctx.tracking_uri, AuditLog(ctx.audit_db_url)), ctx.model_name


def _client(scenario: dict) -> MlflowClient:
    uri = start_run_context("ci", scenario["home"] / "configs").tracking_uri
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _flow_run_and_summary(state) -> tuple[object, str]:
    """The flow run (name, tags) and the markdown of its summary artifact, read back from Prefect."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(run_id)
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id])))
    summaries = [a for a in arts if (a.key or "").startswith("summary-")]
    assert len(summaries) == 1, [a.key for a in arts]
    return run, str(summaries[0].data)


def test_first_run_creates_a_champion(scenario: dict) -> None:
    # given three weeks of validated batches and an empty registry
    _arrive(scenario, scenario["staging"][:21])
    # when the pipeline runs
    state = _run(scenario)
    # then the first model passes the absolute gates and becomes champion, audited
    assert state.is_completed() and state.name == "Completed", state.message
    result = state.result()
    assert (result.outcome, result.version, result.alias) == ("champion", "1", "champion")
    assert result.batches_ingested == 21
    # the run is named and tagged by what it did, and its one summary links the MLflow run and version
    run, summary = _flow_run_and_summary(state)
    assert run.name == "churn-v1-champion" and "outcome:champion" in run.tags, (run.name, run.tags)
    assert "first champion" in state.message
    assert "/#/models/churn/versions/1" in summary and f"/runs/{result.run_id}" in summary, summary
    registry, name = _registry(scenario)
    assert registry.alias_version(name, "champion") == "1"
    entries = AuditLog(start_run_context("ci", scenario["home"] / "configs").audit_db_url).entries(name)
    assert [(e.alias, e.from_version, e.to_version) for e in entries] == [("champion", None, "1")]
    scenario["results"]["first"] = result


def test_better_candidate_becomes_challenger(scenario: dict) -> None:
    # given a fourth week of data (the candidate trains on more history than the champion)
    _arrive(scenario, scenario["staging"][21:])
    state = _run(scenario)
    result = state.result()
    # then it passes the gates against the re-scored champion and becomes challenger; champion stays
    assert state.name == "Completed", state.message
    assert (result.outcome, result.version, result.alias) == ("challenger", "2", "challenger")
    assert result.batches_ingested == 7, "only the new week is ingested"
    registry, name = _registry(scenario)
    assert registry.alias_version(name, "champion") == "1"
    assert registry.alias_version(name, "challenger") == "2"


def test_sabotaged_candidate_is_rejected_and_nothing_moves(scenario: dict) -> None:
    state = _run(scenario, shuffle_labels=True)
    # then the run ends in the named Rejected state (not a crash) ...
    assert state.is_completed() and state.name == "Rejected", state
    result = state.result()
    assert result.outcome == "rejected" and result.alias is None
    # a model fitted on noise still ranks by a random mix of informative features: its AUC wanders far
    # from 0.5 either way (0.40-0.64 over seeds here), so the floor and the champion comparison catch it
    assert {"primary", "vs_champion"} <= set(result.failed_rules), result.failed_rules
    # ... the version is registered, tagged rejected, with its gate report; aliases did not move
    registry, name = _registry(scenario)
    assert registry.alias_version(name, "champion") == "1"
    assert registry.alias_version(name, "challenger") == "2"
    mv = _client(scenario).get_model_version(
        name, result.version
    )
    assert mv.tags.get("flywheel.status") == "rejected"
    assert result.version == "3"
    # findable: the tag, the name and the state message say it; the MLflow run's description links Prefect
    run, summary = _flow_run_and_summary(state)
    assert run.name == "churn-v3-rejected" and "outcome:rejected" in run.tags, (run.name, run.tags)
    assert "churn v3 vs champion v1" in state.message and "vs_champion" in state.message, state.message
    assert "failed gates: " in summary and "outcome:rejected" in summary
    note = _client(scenario).get_run(result.run_id).data.tags["mlflow.note.content"]
    assert "rejected" in note and f"/runs/flow-run/{run.id}" in note, note


def test_renamed_column_batch_is_quarantined_and_nothing_runs(scenario: dict) -> None:
    from flywheel.errors import DataValidationError

    bad_spec = SPEC.model_copy(update={"days": 1, "start": pd.Timestamp("2026-02-01").date(),
                                       "faults": FaultSpec(rename={"monthly_charges": "monthly_charge"})})
    (bad,) = write_batches(bad_spec, scenario["home"] / "data" / "bad")
    _arrive(scenario, [bad])
    ctx = start_run_context("ci", scenario["home"] / "configs")
    features_file = ctx.offline_dir / "churn" / "features.parquet"
    rows_before = len(pd.read_parquet(features_file))
    name = ctx.model_name
    versions_before = len(_client(scenario).search_model_versions(f"name='{name}'"))

    state = _run(scenario)

    assert state.is_failed()
    with pytest.raises(DataValidationError, match="ExpectColumnToExist") as err:
        state.result()
    assert "monthly_charges" in str(err.value)
    assert not (scenario["incoming"] / bad.name).exists(), "the bad batch left the incoming folder"
    assert (ctx.quarantine_dir / bad.name).exists(), "the bad batch is quarantined, not deleted"
    assert len(pd.read_parquet(features_file)) == rows_before, "nothing was ingested"
    assert len(_client(scenario).search_model_versions(f"name='{name}'")) == versions_before


def test_corrupt_parquet_batch_is_quarantined_and_nothing_is_ingested(scenario: dict) -> None:
    """A batch cut short in transfer (half of a real parquet file) arrives beside a good one: the run fails
    naming the file, the corrupt batch is quarantined, the good one waits in incoming, nothing is ingested."""
    from flywheel.errors import DataValidationError

    spec = SPEC.model_copy(update={"days": 2, "start": pd.Timestamp("2026-02-10").date()})
    good, corrupt = write_batches(spec, scenario["home"] / "data" / "corrupt")
    corrupt.write_bytes(corrupt.read_bytes()[: corrupt.stat().st_size // 2])
    _arrive(scenario, [good, corrupt])
    ctx = start_run_context("ci", scenario["home"] / "configs")
    features_file = ctx.offline_dir / "churn" / "features.parquet"
    rows_before = len(pd.read_parquet(features_file)) if features_file.exists() else 0
    versions_before = len(_client(scenario).search_model_versions(f"name='{ctx.model_name}'"))

    state = _run(scenario)

    try:
        assert state.is_failed()
        with pytest.raises(DataValidationError, match="ReadBatch") as err:
            state.result()
        assert corrupt.name in str(err.value), str(err.value)
        assert not (scenario["incoming"] / corrupt.name).exists() and (ctx.quarantine_dir / corrupt.name).exists()
        assert (scenario["incoming"] / good.name).exists(), "the good batch waits for the next run"
        rows_after = len(pd.read_parquet(features_file)) if features_file.exists() else 0
        assert rows_after == rows_before, "nothing was ingested"
        assert len(_client(scenario).search_model_versions(f"name='{ctx.model_name}'")) == versions_before
    finally:
        (scenario["incoming"] / good.name).unlink(missing_ok=True)  # the later tests of this module expect none


def test_champion_reproduces_from_its_lineage(scenario: dict) -> None:
    from flywheel.reproduce import reproduce_version

    ctx = start_run_context("ci", scenario["home"] / "configs")
    report = reproduce_version(ctx.settings, ctx.model_name, "2")
    assert report.data_matches, report.summary()
    assert report.matches, report.summary()
