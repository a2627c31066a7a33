"""`flywheel monitor` end to end: the training flow stores the champion's reference profile with its run
(real Prefect harness, MLflow on SQLite, Feast, GX), then batches are judged one by one in time order
against it: real Great Expectations on the window, real Evidently report, the history in SQLite.

Scenario, in order (one project home): 14 days train the champion; then day 15 is calm, days 16-17 carry
covariate drift 0.3 (the alarm needs 2 drifted windows: exit 0 then 3), a day with out-of-range values is
a data-quality alarm (exit 4) and never a drift alarm; a window of 100 rows is "too few rows".
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flywheel.audit import AuditLog
from flywheel.cli import EXIT_DATA_QUALITY, EXIT_DRIFT_ALARM, app
from flywheel.datagen import DriftSpec, FaultSpec, GeneratorSpec, generate
from flywheel.monitoring.history import MonitoringHistory
from flywheel.monitoring.profile import PROFILE_ARTIFACT
from flywheel.monitoring.reference import TAG_PROFILE_SHA256, load_version_profile
from flywheel.registry import Registry
from flywheel.runtime import start_run_context
from tests.conftest import make_home

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.usefixtures("prefect_harness")]

runner = CliRunner()
TRAIN_DAYS = 14
SPEC = GeneratorSpec(seed=21, days=TRAIN_DAYS + 6, rows_per_day=600, customers=6000)


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from flows.training import TrainingParams, training_pipeline

    home = make_home(tmp_path_factory.mktemp("home"))
    calm = dict(generate(SPEC))
    drifted = dict(generate(SPEC.model_copy(update={"drift": DriftSpec(covariate=0.3)})))
    faulty = dict(generate(SPEC.model_copy(update={"faults": FaultSpec(out_of_range={"monthly_charges": 0.05})})))
    days = sorted(calm)
    incoming = home / "data" / "incoming" / "churn"
    incoming.mkdir(parents=True)
    for day in days[:TRAIN_DAYS]:
        calm[day].to_parquet(incoming / f"batch_{day}.parquet")
    result = training_pipeline(TrainingParams(profile="ci", config_dir=str(home / "configs")))
    assert result.alias == "champion", result
    batches = home / "data" / "batches"
    batches.mkdir()
    files = {}
    for name, frame in (("calm", calm[days[TRAIN_DAYS]]), ("drift1", drifted[days[TRAIN_DAYS + 1]]),
                        ("drift2", drifted[days[TRAIN_DAYS + 2]]), ("faulty", faulty[days[TRAIN_DAYS + 3]]),
                        ("tiny", calm[days[TRAIN_DAYS + 4]].head(100))):
        files[name] = batches / f"{name}.parquet"
        frame.to_parquet(files[name])
    return {"home": home, "files": files, "version": result.version, "train": result}


def _monitor(scenario: dict, *args: str):
    home = scenario["home"]
    return runner.invoke(app, ["monitor", "--profile", "ci", "--config-dir", str(home / "configs"), *args])


def _history(scenario: dict) -> MonitoringHistory:
    return MonitoringHistory(start_run_context("ci", scenario["home"] / "configs").audit_db_url)


def test_the_training_flow_stored_the_reference_profile_with_the_run(scenario: dict) -> None:
    ctx = start_run_context("ci", scenario["home"] / "configs")
    registry = Registry(ctx.tracking_uri, AuditLog(ctx.audit_db_url))
    mv = registry.model_version("churn", scenario["version"])
    artifacts = [a.path for a in registry.client.list_artifacts(mv.run_id, "monitoring")]
    assert artifacts == [PROFILE_ARTIFACT]
    assert TAG_PROFILE_SHA256 in registry.client.get_run(mv.run_id).data.tags
    profile = load_version_profile(registry, "churn", scenario["version"])
    split = json.loads(Path(registry.client.download_artifacts(mv.run_id, "split.json",
                                                               str(scenario["home"] / "dl"))).read_text())
    assert profile.rows == split["counts"]["train"] + split["counts"]["validation"], "the rows the model was fit on"
    assert set(profile.features) == set(ctx.dataset.feature_names)
    assert profile.prediction is not None and profile.prediction.count == profile.rows
    assert profile.features["region"].kind == "categorical" and profile.features["tenure_months"].count > 1000


def test_batches_judged_in_time_order_raise_the_drift_alarm_after_persistence(scenario: dict) -> None:
    files = scenario["files"]
    calm = _monitor(scenario, "--current", str(files["calm"]))
    assert calm.exit_code == 0, calm.output
    assert "no drift" in calm.output and "drift alarm: not raised" in calm.output
    flat = " ".join(calm.output.split())
    assert "performance estimated without labels (600 rows): ROC AUC" in flat, calm.output
    assert "performance realized on its 600 labelled rows: ROC AUC" in flat, "the batch carries its labels"
    report = next((scenario["home"] / "data" / "reports" / "monitoring" / "churn").rglob("*.html"))
    html = report.read_text()
    assert "Dataset Drift" in html and "Wasserstein distance (normed)" in html and "payment_method" in html

    first = _monitor(scenario, "--current", str(files["drift1"]), "--no-report")
    assert first.exit_code == 0, first.output
    assert "drifted" in first.output and "streak 1 of 2" in first.output and "support_tickets_30d" in first.output
    second = _monitor(scenario, "--current", str(files["drift2"]), "--no-report")
    assert second.exit_code == EXIT_DRIFT_ALARM, second.output
    assert "DRIFT ALARM RAISED" in second.output and "streak 2 of 2" in second.output

    history = _history(scenario)
    try:
        recs = history.windows("churn", f"v{scenario['version']}")
    finally:
        history.close()
    assert [r.status for r in recs] == ["ok", "drift", "drift"] and [r.alarm for r in recs] == [False, False, True]
    assert recs[0].estimated_roc_auc is not None and recs[0].estimated_roc_auc_lower <= recs[0].estimated_roc_auc
    assert recs[0].report_path is not None and recs[1].report_path is None
    assert recs[2].prediction_drifted, "the champion scored the batch: its predictions drifted too"
    assert "support_tickets_30d" in recs[2].drifted_features and not recs[2].data_quality_alarm

    again = _monitor(scenario, "--current", str(files["drift2"]), "--no-report")
    assert again.exit_code == EXIT_DRIFT_ALARM, "judging the same batch again gives the same verdict, once"


def test_a_broken_feed_is_a_data_quality_alarm_never_a_drift_alarm(scenario: dict) -> None:
    res = _monitor(scenario, "--current", str(scenario["files"]["faulty"]), "--no-report",
                   "--reference-data", str(next((scenario["home"] / "data" / "incoming" / "churn").glob("*.parquet"))))
    assert res.exit_code == EXIT_DATA_QUALITY, res.output
    assert "DATA-QUALITY ALARM" in res.output and "not a reason to retrain" in res.output
    assert "monthly_charges" in res.output and "outside the dataset's range" in res.output
    assert "Great Expectations ExpectColumnValuesToBeBetween(monthly_charges)" in res.output, "the GX suite ran"
    assert "DRIFT ALARM RAISED" not in res.output


def test_a_small_window_is_too_few_rows_and_a_profile_file_is_a_reference(scenario: dict, tmp_path: Path) -> None:
    ctx = start_run_context("ci", scenario["home"] / "configs")
    registry = Registry(ctx.tracking_uri, AuditLog(ctx.audit_db_url))
    path = tmp_path / "profile.json"
    path.write_text(load_version_profile(registry, "churn", scenario["version"]).to_json())
    res = _monitor(scenario, "--current", str(scenario["files"]["tiny"]), "--reference", str(path), "--no-report")
    assert res.exit_code == 0, res.output
    assert "too few rows" in res.output and "100 < 500" in res.output
    assert "no predictions for the window" in res.output, "a profile file brings no model to score with"


@pytest.mark.parametrize(("args", "message"), [
    (["--current", "nope.parquet"], "current batch file not found: nope.parquet"),
    (["--current", "{calm}", "--reference", "challenger"], "has no alias 'challenger'"),
    (["--current", "{calm}", "--reference", "missing.json"], "cannot read reference profile missing.json"),
    (["--current", "{calm}", "--reference", "champion", "--reference-data", "{calm}"], "not both"),
    (["--current", "{calm}", "--window-start", "2026-01-01"], "both --window-start and --window-end"),
    (["--current", "{calm}", "--window-start", "yesterday", "--window-end", "today"], "expects an ISO 8601 time"),
    (["--current", "{calm}", "--prediction-column", "nope"], "--prediction-column 'nope' is not a column"),
])
def test_bad_input_exits_2_with_a_clear_message(scenario: dict, args: list[str], message: str) -> None:
    args = [a.format(calm=scenario["files"]["calm"]) for a in args]
    res = _monitor(scenario, *args, "--no-report")
    assert res.exit_code == 2, res.output
    assert message in res.output


def test_a_profile_of_another_dataset_is_refused(scenario: dict, tmp_path: Path) -> None:
    text = json.loads(_profile_text(scenario))
    text["dataset"] = "loans"
    path = tmp_path / "loans.json"
    path.write_text(json.dumps(text))
    res = _monitor(scenario, "--current", str(scenario["files"]["calm"]), "--reference", str(path), "--no-report")
    assert res.exit_code == 2 and "of dataset 'loans', not 'churn'" in res.output, res.output


def _profile_text(scenario: dict) -> str:
    ctx = start_run_context("ci", scenario["home"] / "configs")
    registry = Registry(ctx.tracking_uri, AuditLog(ctx.audit_db_url))
    return load_version_profile(registry, "churn", scenario["version"]).to_json()


def test_a_tampered_profile_is_refused(scenario: dict) -> None:
    ctx = start_run_context("ci", scenario["home"] / "configs")
    registry = Registry(ctx.tracking_uri, AuditLog(ctx.audit_db_url))
    run_id = registry.model_version("churn", scenario["version"]).run_id
    original = _profile_text(scenario)
    registry.client.log_text(run_id, original.replace('"rows":', '"rows": 1, "x":', 1), PROFILE_ARTIFACT)
    try:
        res = _monitor(scenario, "--current", str(scenario["files"]["calm"]), "--no-report")
        assert res.exit_code == 2 and "does not match its recorded digest" in res.output, res.output
    finally:
        registry.client.log_text(run_id, original, PROFILE_ARTIFACT)
    shutil.rmtree(scenario["home"] / "dl", ignore_errors=True)
