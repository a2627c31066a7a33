"""Feast feature stage against a real Feast repo (local provider, DuckDB offline, SQLite online) in tmp."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd
import pytest

from flywheel import featurestore as fs
from flywheel.errors import FeatureJoinError, FlywheelError
from flywheel.schemas import DatasetDefinition, FeatureSpec
from flywheel.settings import FeaturesConfig

pytestmark = pytest.mark.integration

T = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
LENIENT = FeaturesConfig(max_dropped_share=1.0, max_all_null_share=1.0)


@pytest.fixture
def offline(settings) -> Path:
    return settings.resolve(settings.paths.offline_dir)


@pytest.fixture
def store(settings):
    return fs.open_store(fs.render_repo(settings.stores, settings.paths.home))


def tiny_dataset() -> DatasetDefinition:
    return DatasetDefinition(
        name="tiny",
        source=Path("unused"),
        entity="uid",
        timestamp="ts",
        created_timestamp="arrived",
        label="y",
        features=[FeatureSpec(name="x", type="float"), FeatureSpec(name="c", type="category")],
        slices=["grp"],
    )


def tiny_rows(*rows: tuple[int, datetime, datetime, float]) -> pd.DataFrame:
    """(uid, event time, arrival time, x) -> a raw batch of the tiny dataset."""
    return pd.DataFrame(
        {
            "uid": [r[0] for r in rows],
            "ts": pd.to_datetime([r[1] for r in rows], utc=True),
            "arrived": pd.to_datetime([r[2] for r in rows], utc=True),
            "x": [r[3] for r in rows],
            "c": ["a"] * len(rows),
            "y": [1] * len(rows),
            "grp": ["g1"] * len(rows),
        }
    )


def tiny_join(store, offline: Path, rows: pd.DataFrame, ttl_days: int = 30, cfg: FeaturesConfig = LENIENT):
    ds = tiny_dataset()
    service = fs.apply_definitions(store, ds, ttl_days, offline)
    fs.ingest_batch(rows, ds, offline, "b1")
    return fs.build_training_set(store, ds, service, cfg, offline, as_of=T + timedelta(days=30))


def x_at(frame: pd.DataFrame, uid: int, ts: datetime) -> float:
    hit = frame[(frame["uid"] == uid) & (frame["ts"] == pd.Timestamp(ts))]
    assert len(hit) == 1, f"expected one training row for uid={uid} at {ts}, got {len(hit)}:\n{frame}"
    return float(hit["x"].iloc[0])


# ------------------------------------------------------------------------------ the whole stage


def assert_reader_matches_feast(store, service_name: str, ids: list) -> None:
    """The service's OnlineReader returns exactly what FeatureStore.get_online_features returns."""
    service = store.get_feature_service(service_name)
    reader = fs.OnlineReader(store, service)
    want = store.get_online_features(features=service, entity_rows=[{reader.key: e} for e in ids]).to_dict()
    got = reader.read(ids)
    assert len(got) == len(ids)
    for i, row in enumerate(got):
        expected = {f: want[f][i] for f in reader.features}
        assert row == expected, f"entity {ids[i]!r}: reader {row} != feast {expected}"
        assert [type(v) for v in row.values()] == [type(v) for v in expected.values()], f"entity {ids[i]!r}"


def test_render_apply_ingest_materialize_online_read(settings, dataset, store, offline, small_batches):
    repo = Path(store.repo_path)
    text = (repo / "feature_store.yaml").read_text()
    assert "type: duckdb" in text and f"path: {settings.paths.home}" in text, text

    service = fs.apply_definitions(store, dataset, settings.features.ttl_days, offline)
    assert service.startswith("churn_") and len(service) == len("churn_") + 8
    for i, batch in enumerate(small_batches):
        fs.ingest_batch(batch, dataset, offline, f"day{i}")
    end = datetime(2026, 1, 15, tzinfo=UTC)
    report = fs.materialize_online(store, dataset, offline, end)
    assert [load.mode for load in report.loads] == ["full"]

    history = pd.concat(small_batches).sort_values(["event_timestamp", "ingested_at"])
    latest = history.groupby("customer_id").tail(1).set_index("customer_id")
    ids = latest.index[:5].tolist()
    online = fs.get_online_features(store, service, [*ids, 10**9]).set_index("customer_id")
    for cid in ids:
        assert online.loc[cid, "tenure_months"] == latest.loc[cid, "tenure_months"], f"customer {cid}"
        assert online.loc[cid, "region"] == latest.loc[cid, "region"], f"customer {cid}"
    assert online.loc[10**9, dataset.feature_names].isna().all(), "an unknown entity reads as all-null"
    assert_reader_matches_feast(store, service, [*latest.index[:60].tolist(), 10**9, ids[0], ids[0]])

    as_of = datetime(2026, 3, 1, tzinfo=UTC)
    frame, join = fs.build_training_set(store, dataset, service, LENIENT, offline, as_of=as_of)
    assert list(frame.columns) == [dataset.entity, dataset.timestamp, dataset.label, *dataset.feature_names,
                                   *dataset.context_columns]
    assert join.entity_rows == sum(len(b) for b in small_batches)
    assert join.training_rows == len(frame) == join.returned_rows - join.all_null_rows
    assert frame[dataset.feature_names].notna().any(axis=1).all(), "all-null rows must be removed"
    assert frame.equals(frame.sort_values([dataset.timestamp, dataset.entity]).reset_index(drop=True))
    assert str(frame[dataset.timestamp].dt.tz) == "UTC"


def test_the_duckdb_join_builds_the_same_training_set_as_feast(settings, dataset, store, offline, small_batches):
    """The default engine (flywheel/pitjoin.py) against get_historical_features on the demo data."""
    service = fs.apply_definitions(store, dataset, settings.features.ttl_days, offline)
    for i, batch in enumerate(small_batches):
        fs.ingest_batch(batch, dataset, offline, f"day{i}")
    frames = {}
    for engine in ("duckdb", "feast"):
        cfg = settings.features.model_copy(update={"join_engine": engine, "max_all_null_share": 1.0})
        frames[engine], join = fs.build_training_set(store, dataset, service, cfg, offline,
                                                     as_of=datetime(2026, 3, 1, tzinfo=UTC))
        assert join.engine == engine and join.dropped_rows == 0
    assert len(frames["duckdb"]) > 0
    pd.testing.assert_frame_equal(frames["duckdb"], frames["feast"], check_dtype=False)


def test_labels_not_yet_known_are_left_out(settings, dataset, store, offline, small_batches):
    service = fs.apply_definitions(store, dataset, settings.features.ttl_days, offline)
    for i, batch in enumerate(small_batches[:4]):
        fs.ingest_batch(batch, dataset, offline, f"day{i}")
    # labels arrive 30 days after the snapshot: at Jan 31 12:00 only some of the first day's are known
    as_of = datetime(2026, 1, 31, 12, tzinfo=UTC)
    _, join = fs.build_training_set(store, dataset, service, LENIENT, offline, as_of=as_of)
    assert join.entity_rows == int((small_batches[0]["label_available_at"] <= as_of).sum()) > 0


# ----------------------------------------------------------------------------- versioned services


def test_reapply_is_a_noop_and_a_changed_definition_gets_a_new_service(settings, dataset, store, offline, tmp_path):
    first = fs.apply_definitions(store, dataset, 90, offline)
    again = fs.apply_definitions(store, dataset, 90, offline)
    assert again == first
    assert [s.name for s in store.list_feature_services()] == [first]
    # the name depends on the definition, not on where the home is
    assert fs.build_definitions(dataset, 90, tmp_path / "elsewhere").service_name == first

    changed = fs.apply_definitions(store, dataset, 30, offline)
    assert changed != first
    assert sorted(s.name for s in store.list_feature_services()) == sorted([first, changed])
    old_view = store.get_feature_view(store.get_feature_service(first).feature_view_projections[0].name)
    assert old_view.ttl == timedelta(days=90), "the old service must keep reading its own view"
    assert store.get_feature_service(changed).tags["flywheel.version"] in changed


def test_changing_a_registered_service_in_place_is_refused(dataset, store, offline):
    from feast import FeatureService

    first = fs.apply_definitions(store, dataset, 90, offline)
    new = fs.build_definitions(dataset, 30, offline)
    forged = fs.FeatureDefinitions(
        source=new.source, entity=new.entity, view=new.view, version=new.version,
        service=FeatureService(name=first, features=[new.view]),
    )
    with pytest.raises(FlywheelError, match="immutable") as err:
        fs.apply_feature_definitions(store, forged)
    assert first in str(err.value)
    assert store.get_feature_view(store.get_feature_service(first).feature_view_projections[0].name).ttl == (
        timedelta(days=90)
    )


# ------------------------------------------------------------------------------------- materialize


def test_first_materialize_loads_the_full_range_then_incremental(store, offline):
    ds = tiny_dataset()
    service = fs.apply_definitions(store, ds, 1, offline)  # TTL 1 day
    old = T - timedelta(days=5)  # older than one TTL before the end: materialize_incremental would skip it
    fs.ingest_batch(tiny_rows((1, old, old, 1.5)), ds, offline, "b1")
    first = fs.materialize_online(store, ds, offline, T)
    assert [(load.mode, load.start) for load in first.loads] == [("full", old)]
    assert fs.get_online_features(store, service, [1])["x"].tolist() == [1.5]

    fs.ingest_batch(tiny_rows((1, T + timedelta(hours=1), T + timedelta(hours=1), 2.5)), ds, offline, "b2")
    second = fs.materialize_online(store, ds, offline, T + timedelta(hours=2))
    assert [load.mode for load in second.loads] == ["incremental"]
    assert fs.get_online_features(store, service, [1])["x"].tolist() == [2.5]


def test_a_batch_of_past_events_after_a_load_to_now_still_reaches_the_online_store(store, offline):
    # given a first load "up to now" (the training flow's as_of), then a batch whose events are older
    # than that now but newer than the first batch (replayed or delayed data)
    ds = tiny_dataset()
    service = fs.apply_definitions(store, ds, 30, offline)
    fs.ingest_batch(tiny_rows((1, T - timedelta(days=3), T - timedelta(days=3), 1.0)), ds, offline, "b1")
    now = T + timedelta(days=20)
    first = fs.materialize_online(store, ds, offline, now)
    assert first.end < now, "the load stops at the newest event, not at `now`"
    fs.ingest_batch(tiny_rows((2, T - timedelta(days=1), T - timedelta(days=1), 2.0)), ds, offline, "b2")
    # when the online store is loaded again (incrementally)
    second = fs.materialize_online(store, ds, offline, now)
    # then the new entity is online: an incremental load from `now` would have skipped it
    assert [load.mode for load in second.loads] == ["incremental"]
    assert fs.get_online_features(store, service, [1, 2])["x"].tolist() == [1.0, 2.0]


def test_a_late_row_in_one_batch_does_not_hide_the_next_batch_from_the_online_store(store, offline):
    # given a first batch with a row that arrived days late, loaded online
    ds = tiny_dataset()
    service = fs.apply_definitions(store, ds, 30, offline)
    d = timedelta(days=1)
    fs.ingest_batch(tiny_rows((1, T - 5 * d, T - 5 * d, 1.0), (3, T - 5 * d, T, 3.0)), ds, offline, "b1")
    fs.materialize_online(store, ds, offline, T + 20 * d)
    # when a batch whose events lie between the first batch's events and that late arrival comes in
    fs.ingest_batch(tiny_rows((2, T - 2 * d, T - 2 * d, 2.0)), ds, offline, "b2")
    fs.materialize_online(store, ds, offline, T + 20 * d)
    # then it is online too
    assert fs.get_online_features(store, service, [1, 2, 3])["x"].tolist() == [1.0, 2.0, 3.0]


# ----------------------------------------------------------------------------------------- leakage


def test_leakage_a_feature_row_from_the_future_never_reaches_an_entity_row(store, offline):
    h = timedelta(hours=1)
    rows = tiny_rows((1, T - h, T - h, 1.0), (1, T, T, 5.0), (1, T + h, T + h, 77.0))
    frame, _ = tiny_join(store, offline, rows)
    assert x_at(frame, 1, T - h) == 1.0
    assert x_at(frame, 1, T) == 5.0, "the row at T must not see the value of T+1h"
    assert x_at(frame, 1, T + h) == 77.0


def test_leakage_a_late_arriving_row_with_an_earlier_event_time_is_excluded(store, offline):
    h = timedelta(hours=1)
    rows = tiny_rows(
        (1, T - 2 * h, T - 2 * h, 1.0),
        (1, T - h, T + 3 * h, 99.0),  # event before T, arrived after T (a backfill)
        (1, T, T + timedelta(minutes=10), 5.0),  # the row itself arrives 10 minutes after its event time
    )
    frame, _ = tiny_join(store, offline, rows)
    assert x_at(frame, 1, T) == 1.0, "only what had ARRIVED by T may be used"

    # the same join without the arrival filter would have leaked: proves the test can fail
    ds = tiny_dataset()
    service = store.get_feature_service(fs.build_definitions(ds, 30, offline).service_name)
    entity_df = pd.DataFrame({"uid": [1], "event_timestamp": [pd.Timestamp(T)]})
    leaky = store.get_historical_features(entity_df=entity_df, features=service).to_df()
    assert leaky["x"].tolist() == [5.0]


def test_arrival_prediction_time_uses_the_rows_own_features(store, offline):
    rows = tiny_rows((1, T, T + timedelta(minutes=10), 5.0))
    cfg = FeaturesConfig(max_dropped_share=1.0, max_all_null_share=1.0, prediction_time="arrival")
    frame, join = tiny_join(store, offline, rows, cfg=cfg)
    assert (join.all_null_rows, x_at(frame, 1, T)) == (0, 5.0)
    assert frame["ts"].tolist() == [pd.Timestamp(T)], "the frame keeps the event time, not the arrival time"


# --------------------------------------------------------------------------- losses and tolerance


def _lossy_rows() -> pd.DataFrame:
    d, m = timedelta(days=1), timedelta(minutes=1)
    return tiny_rows(
        (1, T, T, 1.0),  # fine
        (2, T - 3 * d, T - 3 * d, 2.0),  # fine (its own features)
        (2, T, T + m, 2.5),  # only feature row in time is 3 days old: outside a 1-day TTL
        (3, T, T + m, 3.0),  # no feature row had arrived by T at all
    )


def test_ttl_and_missing_history_are_counted_and_removed(store, offline):
    frame, join = tiny_join(store, offline, _lossy_rows(), ttl_days=1)
    # DuckDB keeps entity rows outside the TTL and returns them with null features (no drop)
    assert (join.entity_rows, join.returned_rows, join.dropped_rows, join.all_null_rows) == (4, 4, 0, 2)
    assert join.all_null_share == 0.5 and join.training_rows == 2
    assert sorted(zip(frame["uid"], frame["x"], strict=True)) == [(1, 1.0), (2, 2.0)]


def test_losses_past_the_tolerance_raise_a_join_error_naming_the_counts(store, offline):
    strict = FeaturesConfig(max_dropped_share=0.0, max_all_null_share=0.25)
    with pytest.raises(FeatureJoinError, match=r"2 of 4 entity rows came back with every feature null") as err:
        tiny_join(store, offline, _lossy_rows(), ttl_days=1, cfg=strict)
    assert err.value.report.all_null_rows == 2


def _gap_rows() -> pd.DataFrame:
    """Lossy rows plus a label for uid 2 at T-1h whose own feature row is then removed from the offline file:
    its only candidates are 3 days old (outside a 1-day TTL) or in its future."""
    return pd.concat([_lossy_rows(), tiny_rows((2, T - timedelta(hours=1), T - timedelta(hours=1), 9.0))])


@pytest.mark.parametrize(("offline_store", "engine", "counts"), [
    ("duckdb", "duckdb", (5, 5, 0, 3)), ("duckdb", "feast", (5, 5, 0, 3)), ("file", "feast", (5, 4, 1, 2))])
def test_both_ways_feast_loses_rows_are_counted(settings, offline, offline_store, engine, counts):
    # DuckDB (our join or Feast's store) returns such a row with null features; the file store drops it
    lenient = LENIENT.model_copy(update={"join_engine": engine})
    stores = settings.stores.model_copy(update={"feast_offline": offline_store})
    store = fs.open_store(fs.render_repo(stores, settings.paths.home))
    ds = tiny_dataset()
    service = fs.apply_definitions(store, ds, 1, offline)
    report = fs.ingest_batch(_gap_rows(), ds, offline, "b1")
    (part,) = Path(report.features_path).glob("*.parquet")  # the batch's part file
    stored = pd.read_parquet(part)
    stored[stored["x"] != 9.0].to_parquet(part)

    frame, join = fs.build_training_set(store, ds, service, lenient, offline, as_of=T + timedelta(days=30))
    assert (join.entity_rows, join.returned_rows, join.dropped_rows, join.all_null_rows) == counts
    assert len(frame) == 2 and join.engine == engine
    strict = FeaturesConfig(max_dropped_share=0.1, max_all_null_share=0.9, join_engine=engine)
    if join.dropped_rows:
        with pytest.raises(FeatureJoinError, match=r"1 of 5 entity rows dropped"):
            fs.build_training_set(store, ds, service, strict, offline, as_of=T + timedelta(days=30))


def test_render_repo_for_redis_online_store(settings):
    from feast.repo_config import load_repo_config

    stores = settings.stores.model_copy(
        update={"feast_online": settings.stores.feast_online.model_copy(update={"type": "redis"})}
    )
    repo = fs.render_repo(stores, settings.paths.home)
    config = load_repo_config(repo, repo / "feature_store.yaml")
    assert (config.online_store.type, config.online_store.connection_string) == ("redis", "127.0.0.1:6379")
    assert config.offline_store.type == "duckdb"


def test_every_feature_type_and_a_string_entity_round_trip(store, offline):
    ds = DatasetDefinition(
        name="typed", source=Path("unused"), entity="account", entity_type="string", timestamp="ts", label="y",
        features=[FeatureSpec(name="f", type="float"), FeatureSpec(name="i", type="int"),
                  FeatureSpec(name="c", type="category"), FeatureSpec(name="b", type="bool")],
    )
    raw = pd.DataFrame({
        "account": ["a-1", "a-2"], "ts": pd.to_datetime([T, T], utc=True), "y": [0, 1],
        "f": [0.5, None], "i": [3, None], "c": ["x", None], "b": [True, None],
    })
    service = fs.apply_definitions(store, ds, 30, offline)
    view = store.get_feature_view(f"typed_fv_{service.split('_')[-1]}")
    assert {f.name: str(f.dtype) for f in view.features} == {"f": "Float64", "i": "Int64", "c": "String", "b": "Bool"}
    fs.ingest_batch(raw, ds, offline, "b1")
    fs.materialize_online(store, ds, offline, T + timedelta(hours=1))
    online = fs.get_online_features(store, service, ["a-1"]).iloc[0]
    assert (online["f"], online["i"], online["c"], online["b"]) == (0.5, 3, "x", True)
    assert_reader_matches_feast(store, service, ["a-2", "a-1", "nobody", "a-1"])
    frame, join = fs.build_training_set(store, ds, service, LENIENT, offline, as_of=T + timedelta(days=1))
    assert (join.entity_rows, join.all_null_rows, len(frame)) == (2, 1, 1), "a-2 has no feature values at all"
    assert frame["account"].tolist() == ["a-1"]


# ------------------------------------------------------------------------------------- the tasks


def test_tasks_run_the_stage_from_a_batch_file(settings, dataset, offline, small_batches, tmp_path):
    from tasks.features import (
        apply_feature_repo,
        build_training_set,
        ingest_batch,
        materialize_features,
        render_feature_repo,
    )

    repo = render_feature_repo.fn(settings.stores, settings.paths.home)
    cfg = settings.features.model_copy(update={"prediction_time": "arrival"})
    paths = []
    for i, batch in enumerate(small_batches[:3]):
        paths.append(tmp_path / f"batch_2026-01-0{i + 1}.parquet")
        batch.to_parquet(paths[-1])
    ingested = datetime(2031, 5, 1, tzinfo=UTC)  # a project clock far from the wall's: the ledger keeps its time
    reports = [ingest_batch.fn(p, dataset, offline, ingested) for p in paths]
    assert [r.batch_id for r in reports] == ["batch_2026-01-01", "batch_2026-01-02", "batch_2026-01-03"]
    assert {e["ingested_at"] for e in fs.ingested_batches(dataset, offline).values()} == {ingested.isoformat()}
    assert ingest_batch.fn(paths[0], dataset, offline, ingested).skipped

    service = apply_feature_repo.fn(repo, dataset, cfg, offline)
    mat = materialize_features.fn(repo, dataset, offline, datetime(2026, 1, 4, tzinfo=UTC))
    assert mat.modes == {f"churn_fv_{service.split('_')[-1]}": "full"}
    frame = build_training_set.fn(repo, dataset, service, cfg, offline, datetime(2026, 3, 1, tzinfo=UTC))
    assert len(frame) > 0.98 * 900, "with arrival-time predictions nearly every row has its own features"
