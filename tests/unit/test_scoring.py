"""Batch scoring logic without stores: entity files, the model input contract, scores, vector comparison."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from flywheel import scoring
from flywheel.errors import FlywheelError
from flywheel.predictor import served_predictor, tolerance
from flywheel.registry import LoadedModel
from flywheel.settings import ImputationConfig, load_settings
from tests.conftest import PROJECT

AT = datetime(2026, 1, 10, tzinfo=UTC)


@pytest.fixture(scope="module")
def model(small_batches: list[pd.DataFrame]) -> LoadedModel:
    from flywheel.schemas import load_dataset
    from flywheel.training import build_pipeline, fit

    ds = load_dataset(PROJECT / "configs" / "datasets" / "churn.yaml")
    pipeline = fit(build_pipeline("logistic_regression", {}, ds, ImputationConfig(), 0), small_batches[0], ds)
    return LoadedModel(pipeline=pipeline, name="churn", version="3", run_id=None, source="test", digests={},
                       trusted_types=[], tags={scoring.TAG_FEATURE_SERVICE: "churn_abc"})


# ---------------------------------------------------------------------------------------- entities


def test_read_entities_parquet_and_csv_deduplicate(tmp_path: Path, dataset) -> None:
    pd.DataFrame({"customer_id": [3, 1, 3, 2], "other": list("abcd")}).to_parquet(tmp_path / "e.parquet")
    pd.DataFrame({"customer_id": [5, 5, 4]}).to_csv(tmp_path / "e.csv", index=False)
    assert scoring.read_entities(tmp_path / "e.parquet", dataset).tolist() == [3, 1, 2]
    ids = scoring.read_entities(tmp_path / "e.csv", dataset)
    assert ids.tolist() == [5, 4] and ids.dtype == "int64" and ids.name == "customer_id"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("customer\n1\n", "has no column 'customer_id'"),
        ("customer_id\n", "has no rows"),
        ("", "is empty"),
        ("customer_id\nabc\n", "is not integer"),
        ("customer_id\n1.5\n", "non-integer"),
        ("customer_id,x\n1,a\n,b\n", "1 missing values"),
    ],
)
def test_read_entities_bad_files_name_the_problem(tmp_path: Path, dataset, content: str, message: str) -> None:
    path = tmp_path / "entities.csv"
    path.write_text(content)
    with pytest.raises(FlywheelError, match=message) as err:
        scoring.read_entities(path, dataset)
    assert str(path) in str(err.value)


def test_read_entities_missing_file_and_wrong_format(tmp_path: Path, dataset) -> None:
    with pytest.raises(FlywheelError, match="does not exist"):
        scoring.read_entities(tmp_path / "nope.parquet", dataset)
    (tmp_path / "ids.txt").write_text("customer_id\n1\n")
    with pytest.raises(FlywheelError, match=r"expected \.parquet or \.csv"):
        scoring.read_entities(tmp_path / "ids.txt", dataset)


def test_offline_entities_are_those_with_rows_by_then(tmp_path: Path, dataset) -> None:
    folder = tmp_path / "churn"
    folder.mkdir()
    t = pd.to_datetime(["2026-01-01", "2026-01-05", "2026-01-20"], utc=True)
    pd.DataFrame({"customer_id": [1, 2, 3], "event_timestamp": t}).to_parquet(folder / "features.parquet")
    pd.DataFrame({"customer_id": [4, 1], "event_timestamp": t[:2]}).to_parquet(folder / "labels.parquet")
    assert scoring.offline_entities(dataset, tmp_path, AT).tolist() == [1, 2, 4]
    with pytest.raises(FlywheelError, match="no entity with rows"):
        scoring.offline_entities(dataset, tmp_path, datetime(2025, 1, 1, tzinfo=UTC))
    with pytest.raises(FlywheelError, match="tz-aware"):
        scoring.offline_entities(dataset, tmp_path, datetime(2026, 1, 10))
    with pytest.raises(FlywheelError, match="ingest a batch first"):
        scoring.offline_entities(dataset, tmp_path / "empty", AT)


# ------------------------------------------------------------------------------------------ scoring


def test_model_input_unifies_store_dtypes(dataset) -> None:
    # one store hands back nullable Int64 with <NA>, the other int64/float/None
    a = pd.DataFrame({f: pd.array([1, None], dtype="Int64") if f.endswith(("months", "30d", "days", "products"))
                      else [1.5, np.nan] for f in dataset.numeric_features})
    for f in dataset.categorical_features:
        a[f] = ["x", np.nan]
    out = scoring.model_input(a, dataset)
    assert all(out[f].dtype == "float64" for f in dataset.numeric_features)
    assert out.loc[1, dataset.categorical_features].tolist() == [None] * len(dataset.categorical_features)
    with pytest.raises(FlywheelError, match="lacks column"):
        scoring.model_input(a.drop(columns=["region"]), dataset)


def test_score_features_nulls_entities_without_features(model, dataset, small_batches) -> None:
    rows = small_batches[1].head(4).set_index("customer_id")[dataset.feature_names].copy()
    rows.iloc[1, rows.columns.get_loc("avg_session_minutes")] = np.nan
    rows.iloc[2, rows.columns.get_loc("payment_method")] = None
    rows.iloc[3] = None  # no features at all
    features = scoring.model_input(rows, dataset)
    scored_at = AT + timedelta(days=400)  # a project clock far from the wall's: the rows carry its time
    out = scoring.score_features(model, features, dataset, AT, "churn_abc", scored_at)

    assert list(out.columns) == ["customer_id", *scoring.OUTPUT_COLUMNS]
    assert out["customer_id"].tolist() == rows.index.tolist()
    assert out["imputed_features"].tolist() == [None, "avg_session_minutes", "payment_method", None]
    assert out["reason"].tolist() == [None, None, None, scoring.REASON_NO_FEATURES]
    assert out["probability"].isna().tolist() == [False, False, False, True]
    assert (out["scored_at"] == pd.Timestamp(scored_at)).all(), "scored_at is the time given, not the wall's"
    expected = model.pipeline.predict_proba(features.iloc[:3])[:, 1]
    served = served_predictor(model, dataset)  # batch scores go through the path the service serves
    assert served.predict_frame(features.iloc[:3]).tolist() == out["probability"].iloc[:3].tolist()
    np.testing.assert_allclose(out["probability"].iloc[:3], expected, rtol=0, atol=tolerance(served.kind))
    assert out["prediction"].iloc[:3].tolist() == [int(p >= 0.5) for p in expected]
    assert out["prediction"].isna().iloc[3]
    assert (out["model_version"] == "3").all() and (out["feature_time"] == pd.Timestamp(AT)).all()

    report = scoring.summarize(out, Path("x.parquet"), 0.1)
    assert (report.rows, report.scored_rows, report.no_feature_rows, report.imputed_rows) == (4, 3, 1, 2)
    assert report.null_share == 0.25
    md = report.to_markdown()
    assert "churn v3" in md and "1 entities had no features" in md and "p50" in md


def test_model_feature_service_is_required(model) -> None:
    assert scoring.model_feature_service(model) == "churn_abc"
    with pytest.raises(FlywheelError, match=r"no 'flywheel.feature_service' tag"):
        scoring.model_feature_service(model.model_copy(update={"tags": {}}))


def test_output_path_and_atomic_write(tmp_path: Path) -> None:
    path = scoring.output_path(tmp_path, "churn", "3", datetime(2026, 3, 1, 2, 30, 5, tzinfo=UTC))
    assert path == tmp_path / "churn" / "v3" / "20260301T023005.parquet"
    scoring.write_parquet_atomic(pd.DataFrame({"a": [1]}), path)
    assert pd.read_parquet(path)["a"].tolist() == [1]
    # a frame pyarrow cannot write fails without leaving a file (or a temp file) behind
    bad = tmp_path / "churn" / "v3" / "bad.parquet"
    with pytest.raises(Exception):  # noqa: B017 - pyarrow's own error type
        scoring.write_parquet_atomic(pd.DataFrame({"a": [object()]}), bad)
    assert sorted(p.name for p in bad.parent.iterdir()) == [path.name]


# --------------------------------------------------------------------------------------------- skew


def test_compare_vectors_tolerance_categorical_and_nulls(dataset) -> None:
    base = {f: 1.0 for f in dataset.numeric_features} | {f: "a" for f in dataset.categorical_features}
    online = pd.DataFrame([base, base, base, base], index=pd.Index([1, 2, 3, 4], name="customer_id"))
    offline = online.copy()
    online.loc[2, "monthly_charges"] = 1.0 + 1e-9  # within tolerance
    online.loc[3, "monthly_charges"] = 1.5
    online.loc[3, "region"] = "b"
    online.loc[4, "payment_method"], offline.loc[4, "payment_method"] = None, None  # both missing: equal
    offline.loc[4, "avg_session_minutes"] = np.nan  # one side missing: a mismatch
    found = scoring.compare_vectors(scoring.model_input(online, dataset), scoring.model_input(offline, dataset),
                                    dataset, 1e-6)
    assert [(m.entity, m.feature) for m in found] == [
        ("3", "monthly_charges"), ("3", "region"), ("4", "avg_session_minutes"),
    ]
    assert found[0].difference == pytest.approx(0.5)
    assert found[2].offline is None and "stale" in found[2].note


def test_skew_report_summary_names_entities_and_values() -> None:
    report = scoring.SkewReport(
        model_name="churn", model_version="1", feature_service="s", offline_time=AT, entities=["7", "8"],
        tolerance=1e-6, max_prediction_difference=0.2, seconds=0.0,
        mismatches=[scoring.SkewMismatch(entity="7", feature="monthly_charges", online=99.0, offline=50.0,
                                         difference=49.0)],
    )
    assert not report.passed and report.skewed_entities == ["7"]
    assert "entity 7 monthly_charges: online=99.0 offline=50.0" in report.summary()
    assert "| 7 | monthly_charges | 99.0 | 50.0 |" in report.to_markdown()


def test_sample_entities_is_bounded_and_seeded() -> None:
    ids = pd.Series(range(1000))
    a, b = scoring.sample_entities(ids, 10, seed=1), scoring.sample_entities(ids, 10, seed=1)
    assert len(a) == 10 and a.tolist() == b.tolist() and a.is_unique
    assert scoring.sample_entities(ids.head(5), 10).tolist() == [0, 1, 2, 3, 4]


# ------------------------------------------------------------------------------------- flow surface


def test_params_reject_naive_times() -> None:
    from pydantic import ValidationError

    from flows.batch_scoring import BatchScoringParams

    assert BatchScoringParams(at="2026-03-01T00:00:00Z").at == AT.replace(day=1, month=3)
    with pytest.raises(ValidationError, match="timezone"):
        BatchScoringParams(at="2026-03-01T00:00:00")


def test_deployment_cron_matches_settings() -> None:
    spec = yaml.safe_load((PROJECT / "deployments" / "prefect.yaml").read_text())
    (dep,) = [d for d in spec["deployments"] if d["name"] == "batch-scoring"]
    assert dep["entrypoint"] == "flows/batch_scoring.py:batch_scoring"
    settings = load_settings(profile="local", config_dir=PROJECT / "configs", environ={})
    assert [s["cron"] for s in dep["schedules"]] == [settings.batch.cron]


def test_cli_score_fails_fast_on_bad_input(home: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from flywheel.cli import app

    base = ["score", "--profile", "ci", "--config-dir", str(home / "configs")]
    res = CliRunner().invoke(app, [*base, "--at", "2026-03-01T00:00:00"])
    assert res.exit_code == 2 and "--at: Value error, at must include a timezone" in res.output, res.output
    (tmp_path / "ids.csv").write_text("id\n1\n")
    res = CliRunner().invoke(app, [*base, "--entities", str(tmp_path / "ids.csv")])
    assert res.exit_code == 2 and "has no column 'customer_id'" in res.output, res.output
    assert not (home / "data" / "predictions").exists()
