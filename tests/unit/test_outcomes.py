"""Outcomes: the honest join, batch validation, the outcomes table, served-feature training frames (tiny
frames; the store on a real SQLite file in a temp folder)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd
import pytest
import sqlalchemy as sa
from pydantic import ValidationError

from flywheel.errors import DataValidationError, FlywheelError
from flywheel.outcomes import (
    OutcomeStore,
    content_id,
    ingest_outcome_file,
    join_outcomes,
    outcome_rows,
    served_training_frame,
    validate_outcomes,
)
from flywheel.schemas import DatasetDefinition, load_dataset
from tests.conftest import PROJECT

T0 = datetime(2026, 3, 1, tzinfo=UTC)  # snapshot times
S1, S2 = T0, T0 + timedelta(days=1)


def h(hours: float) -> datetime:
    return T0 + timedelta(days=2, hours=hours)  # prediction and arrival times, after both snapshots


def _predictions(rows: list[tuple]) -> pd.DataFrame:
    """(entity, at, feature_time, probability) rows."""
    return pd.DataFrame(rows, columns=["entity", "at", "feature_time", "probability"])


def _outcomes(rows: list[tuple]) -> pd.DataFrame:
    """(entity, event_time, y, arrived_at) rows."""
    return pd.DataFrame(rows, columns=["entity", "event_time", "y", "arrived_at"])


@pytest.fixture(scope="module")
def churn() -> DatasetDefinition:
    return load_dataset(PROJECT / "configs" / "datasets" / "churn.yaml")


# ------------------------------------------------------------------------------------------ the join


def test_an_outcome_counts_only_when_it_arrived_after_the_prediction() -> None:
    preds = _predictions([("1", h(1), S1, 0.9), ("2", h(1), S1, 0.2)])
    outs = _outcomes([("1", S1, 1, h(2)),  # arrived after: counts
                      ("2", S1, 0, h(0))])  # already known when the prediction was made: never
    joined = join_outcomes(preds, outs)
    assert list(joined["entity"]) == ["1"] and list(joined["y"]) == [1]
    assert joined["outcome_arrived_at"].iloc[0] == pd.Timestamp(h(2))
    # arrival exactly at the prediction time was known at it too
    assert join_outcomes(preds, _outcomes([("1", S1, 1, h(1))])).empty


def test_a_label_known_before_the_prediction_is_never_used_even_when_delivered_again() -> None:
    preds = _predictions([("1", h(1), S1, 0.9)])
    outs = _outcomes([("1", S1, 1, h(0)), ("1", S1, 1, h(5))])  # known at h0, re-delivered at h5
    assert join_outcomes(preds, outs).empty


def test_an_outcome_of_an_older_snapshot_does_not_count() -> None:
    # the prediction used snapshot S2; the outcome describes S1 (arrived after the prediction, still not its)
    preds = _predictions([("1", h(1), S2, 0.9)])
    assert join_outcomes(preds, _outcomes([("1", S1, 1, h(2))])).empty
    assert list(join_outcomes(preds, _outcomes([("1", S1, 1, h(2)), ("1", S2, 0, h(3))]))["y"]) == [0]


def test_each_prediction_joins_at_most_once_and_to_its_own_snapshot() -> None:
    preds = _predictions([("1", h(1), S1, 0.1), ("1", h(2), S2, 0.2), ("1", h(3), S2, 0.3), ("2", h(1), S1, 0.4)])
    outs = _outcomes([
        ("1", S1, 1, h(4)), ("1", S1, 1, h(6)),  # delivered twice: still one outcome
        ("1", S2, 1, h(5)), ("1", S2, 0, h(7)),  # corrected later: the latest value counts
        ("2", S1, 1, h(8)),
    ])
    joined = join_outcomes(preds, outs)
    assert list(joined["probability"]) == [0.1, 0.2, 0.3, 0.4], "every prediction once, in order"
    assert list(joined.index) == [0, 1, 2, 3]
    assert list(joined["y"]) == [1, 0, 0, 1]
    assert [t.hour for t in joined["outcome_arrived_at"]] == [h(4).hour, h(5).hour, h(5).hour, h(8).hour]


def test_outcomes_not_arrived_by_as_of_are_not_known_yet() -> None:
    preds = _predictions([("1", h(1), S1, 0.9)])
    outs = _outcomes([("1", S1, 1, h(5))])
    assert join_outcomes(preds, outs, as_of=h(4)).empty
    assert len(join_outcomes(preds, outs, as_of=h(5))) == 1


def test_predictions_without_a_snapshot_or_entity_never_join() -> None:
    preds = _predictions([("1", h(1), None, 0.9), (None, h(1), S1, 0.5)])
    outs = _outcomes([("1", S1, 1, h(2))])
    assert join_outcomes(preds, outs).empty
    assert join_outcomes(preds.drop(columns="feature_time"), outs).empty  # a log from before feature_time
    assert join_outcomes(preds, None).empty
    assert list(join_outcomes(preds, outs).columns) == [*preds.columns, "y", "outcome_arrived_at"]


def test_naive_times_from_sqlite_are_taken_as_utc_and_int_entities_match_text() -> None:
    preds = _predictions([(17, h(1).replace(tzinfo=None), S1.replace(tzinfo=None), 0.9)])
    outs = _outcomes([("17", S1, 1, h(2))])
    assert len(join_outcomes(preds, outs)) == 1


# ------------------------------------------------------------------------------------ validation


def _batch(**over) -> pd.DataFrame:
    df = pd.DataFrame({
        "customer_id": [1, 2, 3],
        "event_timestamp": pd.to_datetime([S1, S1, S2], utc=True),
        "churned": ["yes", "no", "no"],
        "label_available_at": pd.to_datetime([S1 + timedelta(days=30)] * 3, utc=True),
        "age_group": ["18-34", "55+", "35-54"],
    })
    for k, v in over.items():
        df[k] = v
    return df


def test_a_good_batch_passes(churn: DatasetDefinition) -> None:
    outcome = validate_outcomes(_batch(), churn, "labels_ok.parquet")
    assert outcome.success and outcome.failures == [] and outcome.row_count == 3


@pytest.mark.parametrize(("change", "expectation", "column", "needle"), [
    ({"customer_id": ["a", "b", "c"]}, "ExpectColumnValuesToBeInTypeList", "customer_id", "integers"),
    ({"customer_id": pd.array([1, None, 3], dtype="Int64")}, "ExpectColumnValuesToNotBeNull", "customer_id", ""),
    ({"churned": ["yes", "maybe", "no"]}, "ExpectColumnValuesToBeInSet", "churned", "one of ['yes', 'no']"),
    ({"churned": ["yes", None, "no"]}, "ExpectColumnValuesToNotBeNull", "churned", ""),
    ({"label_available_at": pd.to_datetime([S1 + timedelta(days=30)] * 3).tz_localize(None)},
     "ExpectColumnValuesToBeOfType", "label_available_at", "timezone-aware"),
    ({"event_timestamp": ["2026-03-01", "2026-03-01", "2026-03-02"]}, "ExpectColumnValuesToBeOfType",
     "event_timestamp", "timezone-aware"),
    ({"label_available_at": pd.to_datetime([S1 - timedelta(hours=1), S1, S2], utc=True)},
     "ExpectOutcomeNotToArriveBeforeItsSnapshot", "label_available_at", "before the snapshot"),
    ({"customer_id": [1, 1, 3], "churned": ["yes", "no", "no"]}, "ExpectOneLabelPerSnapshot", "churned",
     "different labels"),
])
def test_each_problem_alone_fails_the_batch_naming_it(churn: DatasetDefinition, change: dict, expectation: str,
                                                       column: str, needle: str) -> None:
    outcome = validate_outcomes(_batch(**change), churn, "labels_bad.parquet")
    assert not outcome.success
    assert [(f["expectation"], f["column"]) for f in outcome.failures] == [(expectation, column)], outcome.failures
    assert needle in outcome.failures[0].get("detail", ""), outcome.failures


def test_missing_columns_and_empty_batches_fail(churn: DatasetDefinition) -> None:
    outcome = validate_outcomes(_batch().drop(columns=["label_available_at"]), churn, "b")
    failures = [(f["expectation"], f["column"]) for f in outcome.failures]
    assert failures == [("ExpectColumnToExist", "label_available_at")]
    outcome = validate_outcomes(_batch().iloc[:0], churn, "b")
    assert [f["expectation"] for f in outcome.failures] == ["ExpectTableRowCountToBeBetween"]


def test_arrival_before_the_snapshot_names_the_rows(churn: DatasetDefinition) -> None:
    bad = _batch(label_available_at=pd.to_datetime([S1 - timedelta(days=1), S1, S2], utc=True))
    (failure,) = validate_outcomes(bad, churn, "b").failures
    assert failure["unexpected_count"] == 1 and failure["sample_values"][0].startswith("1 @ 2026-03-01")


def test_a_dataset_without_outcomes_refuses_to_ingest(churn: DatasetDefinition) -> None:
    plain = churn.model_copy(update={"outcomes": None})
    with pytest.raises(FlywheelError, match="declares no `outcomes:` section"):
        validate_outcomes(_batch(), plain, "b")


# ------------------------------------------------------------------------------ the definition


def _definition(**over) -> dict:
    data = load_dataset(PROJECT / "configs" / "datasets" / "churn.yaml").model_dump(mode="json")
    data.update(over)
    return data


@pytest.mark.parametrize(("over", "message"), [
    ({"label_timestamp": None}, "outcomes need `label_timestamp`"),
    ({"outcomes": {"label_values": ["churned", "stayed"]}}, "must include positive_label 'yes'"),
    ({"outcomes": {"label_values": ["yes"]}}, "at least 2 items"),
    ({"outcomes": {"label_values": ["yes", "no"], "sorce": "x"}}, "Extra inputs are not permitted"),
    ({"outcomes": None, "training_source": "served_features"}, "declare `outcomes`"),
    ({"training_source": "prediction_log"}, "'offline_store' or 'served_features'"),
    ({"outcomes": {"label_values": ["yes", "no"], "min_training_rows": 0}}, "greater than or equal to 1"),
])
def test_outcome_fields_of_a_dataset_are_strict(over: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        DatasetDefinition.model_validate(_definition(**over))


def test_the_demo_dataset_declares_its_outcomes(churn: DatasetDefinition) -> None:
    assert churn.outcomes is not None and churn.outcomes.label_values == ["yes", "no"]
    assert churn.label_timestamp == "label_available_at" and churn.training_source == "offline_store"


# ------------------------------------------------------------------------------------ the store


def test_rows_are_normalized_and_the_batch_id_is_order_free(churn: DatasetDefinition) -> None:
    rows = outcome_rows(_batch(), churn)
    assert list(rows["entity"]) == ["1", "2", "3"] and list(rows["label"]) == ["yes", "no", "no"]
    assert str(rows["event_time"].dtype) == "datetime64[us, UTC]"
    assert json.loads(rows["context"].iloc[0]) == {"age_group": "18-34"}
    shuffled = outcome_rows(_batch().iloc[[2, 0, 1]], churn)
    assert content_id(rows, churn) == content_id(shuffled, churn)
    changed = outcome_rows(_batch(churned=["yes", "no", "yes"]), churn)
    assert content_id(changed, churn) != content_id(rows, churn)


def test_store_ingests_a_batch_once_and_reads_what_is_known(tmp_path: Path, churn: DatasetDefinition) -> None:
    store = OutcomeStore(f"sqlite:///{tmp_path}/flywheel.db")
    try:
        first = store.ingest(outcome_rows(_batch(), churn), churn, "labels_a.parquet")
        assert (first.skipped, first.rows, first.total_rows) == (False, 3, 3)
        again = store.ingest(outcome_rows(_batch().iloc[::-1], churn), churn, "labels_a_copy.csv")
        assert (again.skipped, again.rows, again.total_rows, again.batch_id) == (True, 0, 3, first.batch_id)
        read = store.read(churn, as_of=S1 + timedelta(days=31))
        assert list(read["entity"]) == ["1", "2", "3"] and list(read["y"]) == [1, 0, 0]
        assert read["arrived_at"].iloc[0] == pd.Timestamp(S1 + timedelta(days=30))
        assert store.read(churn, as_of=S1 + timedelta(days=29)).empty, "not arrived yet"
    finally:
        store.close()


def test_reading_recent_arrivals_keeps_each_snapshots_first_arrival(tmp_path: Path, churn: DatasetDefinition) -> None:
    """`arrived_since` narrows to snapshots with a recent arrival, but keeps their earlier arrivals: a label
    re-delivered during a rollout was still known before it, and the join must see that."""
    store = OutcomeStore(f"sqlite:///{tmp_path}/flywheel.db")
    try:
        early = _batch(label_available_at=pd.to_datetime([h(0)] * 3, utc=True))
        store.ingest(outcome_rows(early, churn), churn, "early")
        store.ingest(outcome_rows(early.head(1).assign(label_available_at=pd.to_datetime([h(5)], utc=True)), churn),
                     churn, "again")
        recent = store.read(churn, as_of=h(10), arrived_since=h(2))
        assert list(recent["entity"]) == ["1", "1"] and sorted(t.hour for t in recent["arrived_at"]) == sorted(
            [h(0).hour, h(5).hour])
        preds = _predictions([("1", h(1), S1, 0.9)])
        assert join_outcomes(preds, recent).empty
    finally:
        store.close()


def test_arrivals_counts_what_arrived_in_the_period_and_the_latest_known(tmp_path: Path, churn: DatasetDefinition
                                                                          ) -> None:
    """What the volume trigger counts (rows arrived after the champion's registration, known by now) and the
    liveness check watches (the latest arrival known by now)."""
    store = OutcomeStore(f"sqlite:///{tmp_path}/flywheel.db")
    try:
        assert store.arrivals("churn", None, h(10)) == (0, None), "nothing ever arrived"
        store.ingest(outcome_rows(_batch(label_available_at=pd.to_datetime([h(0)] * 3, utc=True)), churn), churn, "a")
        store.ingest(outcome_rows(_batch(label_available_at=pd.to_datetime([h(4)] * 3, utc=True)), churn), churn, "b")
        store.ingest(outcome_rows(_batch(label_available_at=pd.to_datetime([h(20)] * 3, utc=True)), churn), churn, "c")
        assert store.arrivals("churn", h(1), h(10)) == (3, h(4)), "after h1, by h10: batch b; c is not known yet"
        assert store.arrivals("churn", None, h(30)) == (9, h(20))
        assert store.arrivals("other", None, h(30)) == (0, None)
    finally:
        store.close()


def test_a_failing_file_is_quarantined_and_nothing_is_stored(tmp_path: Path, churn: DatasetDefinition) -> None:
    url = f"sqlite:///{tmp_path}/flywheel.db"
    bad = tmp_path / "labels_2026-03-31.parquet"
    _batch(churned=["yes", "perhaps", "no"]).to_parquet(bad)
    with pytest.raises(DataValidationError, match=r"ExpectColumnValuesToBeInSet\(churned\)") as err:
        ingest_outcome_file(bad, churn, url, tmp_path / "quarantine")
    assert not bad.exists(), "moved, not left in place"
    moved = Path(err.value.quarantined_to)
    assert moved.is_file() and moved.parent == tmp_path / "quarantine"
    report = json.loads(moved.with_name(moved.name + ".validation.json").read_text())
    assert report["failures"][0]["sample_values"] == ["perhaps"]
    engine = sa.create_engine(url)
    assert not sa.inspect(engine).has_table("flywheel_outcomes"), "the store was never touched"
    engine.dispose()
    good = tmp_path / "labels_2026-03-30.csv"
    _batch().to_csv(good, index=False)  # CSV: timestamps parsed as UTC
    assert ingest_outcome_file(good, churn, url, tmp_path / "quarantine").rows == 3


# ------------------------------------------------------------------------------ served features


def test_served_features_become_one_training_row_per_snapshot_with_an_outcome(churn: DatasetDefinition) -> None:
    feats = {f.name: None for f in churn.features}
    served = pd.DataFrame({
        "entity": ["1", "1", "2", "3"],
        "at": [h(1), h(2), h(1), h(9)],
        "feature_time": [S1, S1, S1, S1],
        "features": [{**feats, "tenure_months": 5, "region": "north"}, {**feats, "tenure_months": 5, "region": "north"},
                     {**feats, "tenure_months": 9, "contract_type": "annual"}, {**feats, "tenure_months": 1}],
    })
    outs = _outcomes([("1", S1, 1, h(0)), ("2", S1, 0, h(3)), ("3", S1, 1, h(3))]).assign(
        label=["yes", "no", "yes"], context=[json.dumps({"age_group": "55+"}), None, None])
    frame, report = served_training_frame(served, outs, churn, as_of=h(4))
    # entity 3 was served after as_of; a label known before the prediction is fine for training (entity 1)
    assert list(frame["customer_id"]) == [1, 2] and list(frame["churned"]) == ["yes", "no"]
    assert list(frame["tenure_months"]) == [5, 9] and frame["contract_type"].tolist() == [None, "annual"]
    assert frame["age_group"].tolist() == ["55+", None]
    assert list(frame.columns) == [churn.entity, churn.timestamp, churn.label, *churn.feature_names, "age_group"]
    assert frame[churn.timestamp].iloc[0] == pd.Timestamp(S1)
    assert (report.predictions, report.snapshots, report.with_outcome) == (3, 2, 2)
    empty, _ = served_training_frame(served, outs.iloc[:0], churn, as_of=h(4))
    assert empty.empty and list(empty.columns) == list(frame.columns)


def test_too_few_served_rows_fail_naming_the_count_and_the_minimum(churn: DatasetDefinition) -> None:
    from flywheel.errors import FlywheelError
    from flywheel.outcomes import ServedTrainingReport, check_served_rows

    assert churn.outcomes is not None and churn.outcomes.min_training_rows == 1000
    report = ServedTrainingReport(predictions=1500, snapshots=1200, with_outcome=999, as_of=h(4))
    with pytest.raises(FlywheelError, match=r"too few training rows from served features of 'churn': 999 served "
                                            r"snapshot\(s\) with an outcome .* the minimum is 1000 .*Not falling "
                                            r"back to the offline store"):
        check_served_rows(report, churn.outcomes.min_training_rows, "churn")
    check_served_rows(report.model_copy(update={"with_outcome": 1000}), 1000, "churn")  # at the minimum: trains


# ------------------------------------------------------------------------------------ the generator


def test_generator_writes_label_batches_by_arrival_day(tmp_path: Path, churn: DatasetDefinition) -> None:
    from flywheel.datagen import LABEL_DELAY, GeneratorSpec, generate, label_batches, write_label_batches

    spec = GeneratorSpec(seed=3, days=3, rows_per_day=40, customers=100)
    days = generate(spec)
    batches = label_batches(days)
    assert [d for d, _ in batches] == [d + LABEL_DELAY for d, _ in days], "one batch per arrival day, 30 days on"
    day0, labels0 = batches[0]
    snapshot = days[0][1]
    assert len(labels0) == len(snapshot) and list(labels0.columns) == [
        "customer_id", "event_timestamp", "churned", "label_available_at", "age_group"]
    assert (labels0["label_available_at"] - labels0["event_timestamp"] == LABEL_DELAY).all()
    assert all(t.date() == day0 for t in labels0["label_available_at"])
    paths = write_label_batches(spec, tmp_path / "labels")
    assert [p.name for p in paths] == [f"labels_{d.isoformat()}.parquet" for d, _ in batches]
    stored = pd.read_parquet(paths[0])
    assert str(stored["label_available_at"].dtype).endswith("UTC]")
    assert validate_outcomes(stored, churn, paths[0].name).success, "the generator's batches are valid outcomes"


# --------------------------------------------------------------------------- prediction log: feature_time


def test_an_existing_prediction_log_gains_feature_time_and_keeps_its_rows(tmp_path: Path) -> None:
    """A database created before `feature_time` existed: the column is added in place at start (the
    migration path), old rows read it as null, new rows store it."""
    from flywheel.predictionlog import PredictionLog, Writer

    url = f"sqlite:///{tmp_path}/p.db"
    old = sa.MetaData()
    sa.Table("flywheel_predictions", old, sa.Column("id", sa.Integer, primary_key=True),
             *[sa.Column(c, sa.String) for c in ("at", "request_id", "entity", "model", "version", "arm",
                                                 "features", "imputed", "explanation")],
             *[sa.Column(c, sa.Float) for c in ("probability", "latency_ms")],
             *[sa.Column(c, sa.Boolean) for c in ("prediction", "shadow")])
    engine = sa.create_engine(url)
    old.create_all(engine)
    with engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO flywheel_predictions (at, request_id, entity, model, version, arm, features,"
                             " imputed, probability, latency_ms, prediction, shadow) VALUES ('2026-11-01 00:00:00',"
                             " 'old', '1', 'churn', '1', 'champion', '{}', '[]', 0.5, 1.0, 0, 0)"))
    writer = Writer(url)
    assert "feature_time" in {c["name"] for c in sa.inspect(engine).get_columns("flywheel_predictions")}
    now = datetime.now(UTC)
    writer.add([{"at": now, "request_id": "new", "entity": 2, "model": "churn", "version": "1", "arm": "champion",
                 "prediction": True, "probability": 0.9, "latency_ms": 1.0, "features": {}, "imputed": [],
                 "feature_time": S1}])
    assert writer.flush() == 1
    writer.engine.dispose()
    log = PredictionLog(url)  # a second start: nothing to add, nothing fails
    rows = {r["request_id"]: r for r in log.rows()}
    log.close()
    assert rows["old"]["feature_time"] is None
    assert pd.Timestamp(rows["new"]["feature_time"]).tz_localize(UTC) == pd.Timestamp(S1)
    engine.dispose()


def test_a_missing_not_null_column_is_refused_naming_it(tmp_path: Path) -> None:
    from flywheel import migrations

    engine = sa.create_engine(f"sqlite:///{tmp_path}/x.db")
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE t (id INTEGER PRIMARY KEY)"))
    table = sa.Table("t", sa.MetaData(), sa.Column("id", sa.Integer, primary_key=True),
                     sa.Column("note", sa.String, nullable=True), sa.Column("must", sa.String, nullable=False))
    with pytest.raises(FlywheelError, match="table t: column 'must' is missing and NOT NULL"):
        migrations.add_missing_columns(engine, table)
    assert "note" in {c["name"] for c in sa.inspect(engine).get_columns("t")}, "the nullable one was added first"
    engine.dispose()
