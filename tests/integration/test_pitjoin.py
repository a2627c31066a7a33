"""The DuckDB point-in-time join (flywheel/pitjoin.py) against Feast's own get_historical_features (DuckDB
offline store) on a real Feast repo in tmp: the same rows and values for every rule (event time, arrival
time, TTL, ties, missing entities), on hand-built frames and on random ones."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from flywheel import pitjoin
from flywheel.errors import FlywheelError

pytestmark = pytest.mark.integration

T = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
H, D = timedelta(hours=1), timedelta(days=1)


def feature_rows(*rows: tuple[int, datetime, datetime | None, float], name: str = "x") -> pd.DataFrame:
    """(uid, event time, created time, value) -> a view's offline rows."""
    return pd.DataFrame({
        "uid": np.array([r[0] for r in rows], dtype=np.int64),
        "ts": pd.to_datetime([r[1] for r in rows], utc=True).astype("datetime64[us, UTC]"),
        "created": pd.to_datetime([r[2] for r in rows], utc=True).astype("datetime64[us, UTC]"),
        name: [r[3] for r in rows],
    })


def entity_rows(*rows: tuple[int, datetime]) -> pd.DataFrame:
    return pd.DataFrame({
        "row": np.arange(len(rows), dtype=np.int64),
        "uid": np.array([r[0] for r in rows], dtype=np.int64),
        "event_timestamp": pd.to_datetime([r[1] for r in rows], utc=True).astype("datetime64[us, UTC]"),
    })


def make_store(folder: Path, views: dict[str, tuple[pd.DataFrame | dict[str, pd.DataFrame], timedelta | None]],
               layout: str = "file"):
    """A Feast repo with one view per entry (its rows, its TTL) behind one service: (store, service).

    layout "file": one parquet file per view; "folder": the rows split into one file per batch under a folder
    (the source is the folder, ParquetFormat); "glob": the same files, the source a `folder/*.parquet` glob."""
    from feast import Entity, FeatureService, FeatureStore, FeatureView, Field, FileSource, ValueType
    from feast.data_format import ParquetFormat
    from feast.types import Float64, Int64, String

    repo = folder / "repo"
    repo.mkdir(parents=True, exist_ok=True)
    (repo / "feature_store.yaml").write_text(yaml.safe_dump({
        "project": "pit", "provider": "local",
        "registry": {"registry_type": "file", "path": str(repo / "registry.db")},
        "offline_store": {"type": "duckdb"},
        "online_store": {"type": "sqlite", "path": str(repo / "online.db")},
        "entity_key_serialization_version": 3, "auth": {"type": "no_auth"},
    }))
    store = FeatureStore(repo_path=str(repo))
    entity = Entity(name="uid", join_keys=["uid"], value_type=ValueType.INT64)
    objects: list = [entity]
    for name, (rows, ttl) in views.items():
        if layout == "file":
            path, fmt = folder / f"{name}.parquet", None
            rows.to_parquet(path, index=False)
        else:
            batches = folder / name
            batches.mkdir()
            for i, part in enumerate(np.array_split(rows, 3)):
                part.to_parquet(batches / f"batch_{i:03d}.parquet", index=False)
            path, fmt = (batches, ParquetFormat()) if layout == "folder" else (batches / "*.parquet", None)
        features = [c for c in rows.columns if c not in ("uid", "ts", "created")]
        kind = {"f": Float64, "i": Int64, "O": String}
        source = FileSource(name=f"{name}_src", path=str(path), timestamp_field="ts",
                            created_timestamp_column="created", **({"file_format": fmt} if fmt else {}))
        objects.append(FeatureView(
            name=name, entities=[entity], ttl=ttl, source=source,
            schema=[Field(name="uid", dtype=Int64)] + [Field(name=c, dtype=kind[rows[c].dtype.kind]) for c in features],
        ))
    service = FeatureService(name="svc", features=objects[1:])
    store.apply([*objects, service])
    return store, service


def both(store, service, entities: pd.DataFrame, filter_by_created: bool = True) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(ours, Feast's), each sorted by the entity row, features as float or object."""
    ours = pitjoin.point_in_time_join(entities, "event_timestamp", pitjoin.view_specs(store, service),
                                      filter_by_created=filter_by_created)
    theirs = store.get_historical_features(entity_df=entities, features=service,
                                           filter_by_created_timestamp=filter_by_created).to_df()
    cols = [c for c in ours.columns if c not in entities.columns]
    out = []
    for frame in (ours, theirs):
        frame = frame.sort_values("row").reset_index(drop=True)[["row", "uid", *cols]]
        for c in cols:
            frame[c] = frame[c].astype(float) if frame[c].dtype.kind in "fiu" else frame[c].astype(object)
        out.append(frame)
    return out[0], out[1]


def assert_same(store, service, entities: pd.DataFrame, filter_by_created: bool = True) -> pd.DataFrame:
    ours, theirs = both(store, service, entities, filter_by_created)
    assert len(ours) == len(entities) == len(theirs), "an entity row was lost or repeated"
    pd.testing.assert_frame_equal(ours, theirs, check_dtype=False)
    return ours


def test_each_rule_matches_feast(tmp_path):
    rows = feature_rows(
        (1, T - 3 * H, T - 3 * H, 1.0),
        (1, T - 2 * H, T + H, 2.0),  # a backfill: event before T, arrived after T
        (1, T - H, T - H, 3.0),  # the latest that had arrived by T
        (1, T + H, T + H, 4.0),  # the future
        (2, T - 2 * D, T - 2 * D, 5.0),  # outside a 1-day TTL at T, inside at T - 1.5 days
        (3, T - H, T - H, 6.0), (3, T - H, T - H / 2, 7.0),  # a tie on event time: later arrival wins
        (4, T - H, T - H, 8.0), (4, T - H, T + H, 9.0),  # a tie whose later copy arrives after T: the first counts
        (5, T - D, T - D, 10.0),  # exactly one TTL old at T: still in (Feast's bound is inclusive)
        (6, T, T, 11.0),  # event and arrival exactly at T: in
    )
    store, service = make_store(tmp_path, {"v": (rows, D)})
    entities = entity_rows((1, T), (1, T - 2 * H), (2, T), (2, T - 1.5 * D), (3, T), (4, T), (5, T), (6, T),
                           (7, T), (1, T + 2 * H), (1, T - 10 * H))
    ours = assert_same(store, service, entities)
    # by rule: backfill left out, event-time order, expired, in TTL, later arrival wins a tie, a tie's copy
    # from the future left out, TTL bound inclusive, exactly at T, unknown entity, the future row, nothing yet
    assert ours["x"].fillna(-1).tolist() == [3.0, 1.0, -1, 5.0, 7.0, 8.0, 10.0, 11.0, -1, 4.0, -1]
    assert_same(store, service, entities, filter_by_created=False)  # the created filter off: Feast's leak too


def test_several_views_with_their_own_ttls_and_a_missing_entity(tmp_path):
    a = feature_rows((1, T - 2 * D, T - 2 * D, 1.0), (2, T - 6 * H, T - 5 * H, 2.0), name="a")
    b = feature_rows((1, T - 20 * D, T - 20 * D, 10.0), (3, T - H, T, 30.0), name="b")
    b["label"] = ["gold", "silver"]
    b["n"] = np.array([7, 9], dtype=np.int64)
    store, service = make_store(tmp_path, {"va": (a, 3 * D), "vb": (b, 30 * D)})
    entities = entity_rows((1, T), (2, T), (3, T), (9, T), (1, T + 5 * D))
    ours = assert_same(store, service, entities)
    expired = ours.loc[ours["row"] == 4, ["a", "b"]].isna().to_numpy().tolist()
    assert expired == [[True, False]], "a expired, b still in TTL"
    assert ours.loc[ours["row"] == 3, ["a", "b", "label", "n"]].isna().all(axis=None), "unknown entity: all null"
    assert ours.loc[ours["row"] == 2, "label"].item() == "silver"


@pytest.mark.parametrize("layout", ["folder", "glob"])
def test_a_folder_of_batch_files_reads_like_one_file(tmp_path, layout):
    rng = np.random.default_rng(1)
    n = 300
    rows = feature_rows(*[(int(u), T - int(m) * H, T - int(m) * H + int(lag) * H, float(v)) for u, m, lag, v in
                          zip(rng.integers(0, 20, n), rng.integers(0, 200, n), rng.integers(0, 5, n),
                              rng.normal(size=n), strict=True)])
    rows = rows.drop_duplicates(["uid", "ts", "created"])
    entities = entity_rows(*[(int(u), T - int(m) * H) for u, m in zip(rng.integers(0, 22, 200),
                                                                      rng.integers(0, 200, 200), strict=True)])
    store, service = make_store(tmp_path / "one", {"v": (rows, 2 * D)})
    single = assert_same(store, service, entities)
    store, service = make_store(tmp_path / "many", {"v": (rows, 2 * D)}, layout=layout)
    batched = assert_same(store, service, entities)
    pd.testing.assert_frame_equal(single, batched)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_frames_with_many_ties_match_feast(tmp_path, seed):
    """Few entities, times on an hourly grid (many equal event times), arrivals late by 0-40 hours."""
    rng = np.random.default_rng(seed)
    n = 2000
    uid, hours, lag = rng.integers(0, 30, n), rng.integers(0, 24 * 20, n), rng.integers(0, 40, n)
    rows = feature_rows(*[(int(u), T - int(h) * H, T - int(h) * H + int(g) * H, float(i))
                          for i, (u, h, g) in enumerate(zip(uid, hours, lag, strict=True))])
    rows = rows.drop_duplicates(["uid", "ts", "created"])  # exact duplicates are broken arbitrarily by both
    entities = entity_rows(*[(int(u), T - int(h) * H) for u, h in
                             zip(rng.integers(0, 32, 1500), rng.integers(0, 24 * 21, 1500), strict=True)])
    store, service = make_store(tmp_path, {"v": (rows, 3 * D)})
    ours = assert_same(store, service, entities)
    assert 0 < ours["x"].isna().sum() < len(ours), "the frames exercise both found and expired/missing rows"
    assert_same(store, service, entities, filter_by_created=False)


def test_bad_entity_frames_fail_closed(tmp_path):
    store, service = make_store(tmp_path, {"v": (feature_rows((1, T, T, 1.0)), D)})
    specs = pitjoin.view_specs(store, service)
    naive = entity_rows((1, T)).assign(event_timestamp=lambda f: f["event_timestamp"].dt.tz_localize(None))
    with pytest.raises(FlywheelError, match="tz-aware"):
        pitjoin.point_in_time_join(naive, "event_timestamp", specs)
    with pytest.raises(FlywheelError, match=r"lacks \['uid'\]"):
        pitjoin.point_in_time_join(entity_rows((1, T)).drop(columns="uid"), "event_timestamp", specs)
    with pytest.raises(FlywheelError, match="appear twice"):
        pitjoin.point_in_time_join(entity_rows((1, T)).assign(x=1.0), "event_timestamp", specs)


@pytest.mark.parametrize("layout", ["file", "folder"])
def test_entity_rows_join_reads_only_its_entities_rows_and_agrees(tmp_path, layout):
    """A batch-scoring partition's join (`entity_rows_join`): the same rows and values as the whole-store join and
    as Feast's, from only the feature rows of its own entities (ready by its latest time), per view."""
    rng = np.random.default_rng(7)
    n = 3000
    uid, hours, lag = rng.integers(0, 100, n), rng.integers(0, 24 * 10, n), rng.integers(0, 30, n)
    rows = feature_rows(*[(int(u), T - int(h) * H, T - int(h) * H + int(g) * H, float(i))
                          for i, (u, h, g) in enumerate(zip(uid, hours, lag, strict=True))])
    rows = rows.drop_duplicates(["uid", "ts", "created"])
    other = feature_rows(*[(int(u), T - int(h) * H, T - int(h) * H, float(u)) for u, h in
                           zip(rng.integers(0, 100, 500), rng.integers(0, 24 * 10, 500), strict=True)], name="y")
    other = other.drop_duplicates(["uid", "ts", "created"])
    store, service = make_store(tmp_path, {"v": (rows, 3 * D), "w": (other, 30 * D)}, layout=layout)
    specs = pitjoin.view_specs(store, service)
    # a partition: 10 of the 100 stored entities (one twice, at two times) and one the store never saw
    part = entity_rows((3, T), (17, T), (17, T - 2 * D), (25, T), (31, T), (40, T), (52, T), (60, T), (77, T),
                       (88, T), (99, T), (1000, T))

    filtered, read = pitjoin.entity_rows_join(part, "event_timestamp", specs)

    whole = pitjoin.point_in_time_join(part, "event_timestamp", specs)
    pd.testing.assert_frame_equal(filtered, whole)
    ours, theirs = both(store, service, part)
    pd.testing.assert_frame_equal(ours, theirs, check_dtype=False)
    keys = set(part["uid"])
    for name, frame in (("v", rows), ("w", other)):
        mine = frame["uid"].isin(keys) & (frame[["ts", "created"]].max(axis=1) <= T)
        assert read[name] == int(mine.sum()), f"view {name}: only its entities' rows ready by T"
        assert 0 < read[name] < len(frame) // 5, f"view {name}: a fraction of the store, not all of it"
    assert filtered.loc[filtered["uid"] == 1000, ["x", "y"]].isna().all(axis=None)
