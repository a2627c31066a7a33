"""Bulk materialization (`load_view` through the online store's own `online_write_batch`) against Feast's own
`materialize`, on real Feast repos in tmp: SQLite, and Redis on a redis-server of the test's own."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pytest

from flywheel import featurestore as fs
from flywheel.schemas import DatasetDefinition, FeatureSpec
from tests.integration.test_features import tiny_dataset, tiny_rows
from tests.production.conftest import PrivateRedis

pytestmark = pytest.mark.integration

T = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
H = timedelta(hours=1)


def _store(settings, name: str, online: dict | None = None):
    """A Feast repo of its own (registry, online store) in the same home, over the same offline folder."""
    home = settings.paths.home
    online_cfg = settings.stores.feast_online.model_copy(
        update=online or {"path": Path(f"data/online_{name}.db")})
    stores = settings.stores.model_copy(update={"feast_repo": Path(f"data/repo_{name}"),
                                                "feast_registry": Path(f"data/registry_{name}.db"),
                                                "feast_online": online_cfg})
    return fs.open_store(fs.render_repo(stores, home))


@pytest.fixture
def offline(settings) -> Path:
    return settings.resolve(settings.paths.offline_dir)


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path_factory.mktemp("redis"), persist=False)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _online(store, service: str, ids: list) -> list[tuple[dict, datetime | None]]:
    reader = fs.OnlineReader(store, store.get_feature_service(service))
    values, times = reader.read_timed(ids)
    return list(zip(values, times, strict=True))


def _typed_dataset() -> DatasetDefinition:
    return DatasetDefinition(
        name="typed", source=Path("unused"), entity="account", entity_type="string", timestamp="ts",
        created_timestamp="arrived", label="y",
        features=[FeatureSpec(name="f", type="float"), FeatureSpec(name="i", type="int"),
                  FeatureSpec(name="c", type="category"), FeatureSpec(name="b", type="bool")],
    )


def test_online_rows_are_the_protos_feast_builds(settings, offline):
    from feast.utils import _convert_arrow_to_proto

    store = _store(settings, "a")
    ds = _typed_dataset()
    service = fs.apply_definitions(store, ds, 30, offline)
    view = store.get_feature_view(store.get_feature_service(service).feature_view_projections[0].name)
    ts = pa.array([T, T - H, T - 2 * H], pa.timestamp("us", tz="UTC"))
    table = pa.table({"account": ["a", "b", "c"], "f": [0.5, None, float("nan")], "i": pa.array([3, None, 0]),
                      "c": ["x", None, ""], "b": [True, None, False], "ts": ts, "arrived": ts})
    ours = fs._online_rows(table, view)
    theirs = _convert_arrow_to_proto(table, view, {"account": view.entity_columns[0].dtype.to_value_type()})
    assert len(ours) == len(theirs) == 3
    for (k1, v1, e1, c1), (k2, v2, e2, c2) in zip(ours, theirs, strict=True):
        assert k1.SerializeToString() == k2.SerializeToString()
        assert {n: p.SerializeToString() for n, p in v1.items()} == {n: p.SerializeToString() for n, p in v2.items()}
        assert (e1, c1) == (e2, c2)


@pytest.mark.parametrize("online", ["sqlite", "redis"])
def test_bulk_load_writes_what_feast_materialize_writes(settings, offline, small_batches, online, request,
                                                        monkeypatch):
    monkeypatch.setattr(fs, "LOAD_CHUNK", 97)  # several chunks of an odd size
    if online == "redis":
        port = request.getfixturevalue("redis_server").port
        ours = _store(settings, "ours", {"type": "redis", "connection_string": f"127.0.0.1:{port},db=1"})
        feasts = _store(settings, "feast", {"type": "redis", "connection_string": f"127.0.0.1:{port},db=2"})
    else:
        ours, feasts = _store(settings, "ours"), _store(settings, "feast")
    ds = _churn(settings)
    service = fs.apply_definitions(ours, ds, 30, offline)
    assert fs.apply_definitions(feasts, ds, 30, offline) == service
    for i, batch in enumerate(small_batches[:4]):
        fs.ingest_batch(batch, ds, offline, f"day{i}")
    end = datetime(2026, 2, 1, tzinfo=UTC)
    report = fs.materialize_online(ours, ds, offline, end)
    (load,) = report.loads
    feasts.materialize(start_date=load.start, end_date=load.end)

    ids = [*sorted({int(i) for b in small_batches[:4] for i in b[ds.entity]}), 999_999_999]
    assert load.rows == len(ids) - 1, "one row per entity"
    assert _online(ours, service, ids) == _online(feasts, service, ids)
    assert _stored(ours, load.view) == _stored(feasts, load.view), "byte-identical storage"
    view = ours.get_feature_view(load.view)
    assert list(view.materialization_intervals) == [(load.start, load.end)]

    # an incremental load (Redis: through the store's own online_write_batch, with its timestamp check)
    fs.ingest_batch(small_batches[4], ds, offline, "day4")
    (inc,) = fs.materialize_online(ours, ds, offline, end).loads
    assert inc.mode == "incremental"
    feasts.materialize(start_date=inc.start, end_date=inc.end)
    assert _stored(ours, load.view) == _stored(feasts, load.view)
    if online == "redis":
        _flush(ours, feasts)


def _stored(store, view: str) -> list | dict:
    """Everything the online store holds: the view's SQLite table rows, or every Redis hash of the db."""
    cfg = store.config.online_store
    if cfg.type == "sqlite":
        import sqlite3

        with sqlite3.connect(cfg.path) as con:
            return con.execute(f"SELECT entity_key, feature_name, value, value_text, event_ts, created_ts "
                               f"FROM flywheel_{view} ORDER BY entity_key, feature_name").fetchall()

    client = _redis_client(cfg.connection_string)
    return {k: client.hgetall(k) for k in client.scan_iter()}


def _churn(settings):
    from flywheel.schemas import load_dataset

    return load_dataset(settings.resolve(settings.dataset))


def _flush(*stores) -> None:

    for store in stores:
        _redis_client(store.config.online_store.connection_string).flushdb()


def _redis_client(connection_string: str):
    """A client (default user) on the host, port and db of a Feast connection string."""
    import redis

    address, *params = connection_string.split(",")
    host, port = address.split(":")
    return redis.Redis(host=host, port=int(port), db=int(dict(p.split("=") for p in params)["db"]))


def test_a_rerun_writes_nothing_and_a_late_row_in_the_window_is_picked_up(settings, offline):
    store = _store(settings, "a")
    ds = tiny_dataset()
    service = fs.apply_definitions(store, ds, 30, offline)
    fs.ingest_batch(tiny_rows((1, T - 3 * H, T - 3 * H, 1.0), (2, T - 2 * H, T - 2 * H, 2.0),
                              (1, T, T, 1.5)), ds, offline, "b1")
    first = fs.materialize_online(store, ds, offline, T + 10 * H)
    assert [(x.mode, x.rows) for x in first.loads] == [("full", 2)]
    again = fs.materialize_online(store, ds, offline, T + 10 * H)
    assert [(x.mode, x.rows) for x in again.loads] == [("up-to-date", 0)]

    # late rows, inside the window already loaded: entity 2's is its newest value, entity 1's is older than
    # the value online (the online store keeps the newest event, as Feast's materialize would)
    fs.ingest_batch(tiny_rows((2, T - H, T + 5 * H, 2.5), (1, T - H, T + 5 * H, 9.0)), ds, offline, "late")
    late = fs.materialize_online(store, ds, offline, T + 10 * H)
    assert [(x.mode, x.start) for x in late.loads] == [("incremental", T - H)]
    assert [v["x"] for v, _ in _online(store, service, [1, 2])] == [1.5, 2.5]
    assert [x.mode for x in fs.materialize_online(store, ds, offline, T + 10 * H).loads] == ["up-to-date"]


def test_no_row_is_lost_at_the_watermark(settings, offline):
    store = _store(settings, "a")
    ds = tiny_dataset()
    service = fs.apply_definitions(store, ds, 30, offline)
    # a batch still arriving when the first load runs: rows before, at and after its end
    fs.ingest_batch(tiny_rows((1, T - H, T - H, 1.0), (2, T, T, 2.0), (3, T + H, T + H, 3.0)), ds, offline, "b1")
    first = fs.materialize_online(store, ds, offline, T)
    assert (first.end, first.loads[0].rows) == (T, 2), "the row exactly at the end is in the first load"
    assert "materialized_at" not in fs.ingested_batches(ds, offline)["b1"], "b1 is not all loaded yet"
    # the next batch starts exactly at the previous load's end
    fs.ingest_batch(tiny_rows((4, T, T + 2 * H, 4.0)), ds, offline, "b2")
    second = fs.materialize_online(store, ds, offline, T + 3 * H)
    assert [(x.mode, x.start) for x in second.loads] == [("incremental", T - H)]
    assert [v["x"] for v, _ in _online(store, service, [1, 2, 3, 4])] == [1.0, 2.0, 3.0, 4.0]
    assert all("materialized_at" in e for e in fs.ingested_batches(ds, offline).values())


def test_bulk_entity_keys_are_feasts_serialized_keys(settings, offline):
    from feast.infra.key_encoding_utils import serialize_entity_key
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey
    from feast.type_map import python_values_to_proto_values

    store = _store(settings, "a")
    version = store.config.entity_key_serialization_version
    cases = ((_churn(settings), [0, -1, 7, 2**62, -(2**63)]), (_typed_dataset(), ["a", "", "é-ü", "x" * 300]))
    for ds, values in cases:
        service = fs.apply_definitions(store, ds, 30, offline)
        view = store.get_feature_view(store.get_feature_service(service).feature_view_projections[0].name)
        (key,) = view.entity_columns
        protos = python_values_to_proto_values(values, key.dtype.to_value_type())
        theirs = [serialize_entity_key(EntityKey(join_keys=[key.name], entity_values=[v]),
                                       entity_key_serialization_version=version) for v in protos]
        table = pa.table({ds.entity: values})
        assert fs._entity_keys(store, view, table) == theirs
        assert fs._entity_keys(store, view, table, suffix=b"proj") == [k + b"proj" for k in theirs]


@pytest.mark.parametrize("scripting", [True, False])
def test_redis_first_load_with_a_ttl_with_and_without_scripting(settings, offline, small_batches, redis_server,
                                                                scripting, caplog, monkeypatch):
    """The bulk write through the server-side script, and the plain HSET pipeline a server refusing scripts gets
    (an ACL user without @scripting), both store what Feast's materialize stores, TTL included."""
    import logging

    import redis

    monkeypatch.setattr(fs, "SCRIPT_ENTITIES", 7)  # several script calls per chunk
    admin = redis.Redis(host="127.0.0.1", port=redis_server.port)
    admin.execute_command("ACL", "SETUSER", "noscript", "on", "nopass", "~*", "&*", "+@all", "-@scripting")
    user = "" if scripting else ",username=noscript"
    base = f"127.0.0.1:{redis_server.port}"
    ours = _with_key_ttl(_store(settings, "ours", {"type": "redis", "connection_string": f"{base},db=3{user}"}))
    feasts = _with_key_ttl(_store(settings, "feast", {"type": "redis", "connection_string": f"{base},db=4"}))
    ds = _churn(settings)
    fs.apply_definitions(ours, ds, 30, offline)
    fs.apply_definitions(feasts, ds, 30, offline)
    for i, batch in enumerate(small_batches[:3]):
        fs.ingest_batch(batch, ds, offline, f"day{i}")
    with caplog.at_level(logging.INFO, logger="flywheel.featurestore"):
        (load,) = fs.materialize_online(ours, ds, offline, datetime(2026, 2, 1, tzinfo=UTC)).loads
    feasts.materialize(start_date=load.start, end_date=load.end)
    try:
        assert ("refused the bulk-write script" in caplog.text) is not scripting
        stored = _stored(ours, load.view)
        assert stored and stored == _stored(feasts, load.view)
        client = redis.Redis(host="127.0.0.1", port=redis_server.port, db=3)
        assert all(0 < client.ttl(k) <= 3600 for k in stored)
    finally:
        _flush(ours, feasts)


def _with_key_ttl(store, seconds: int = 3600):
    """The same repo with the Redis store's `key_ttl_seconds` set (Flywheel's settings do not set it; a
    hand-edited feature_store.yaml can)."""
    import yaml

    path = Path(store.repo_path) / "feature_store.yaml"
    config = yaml.safe_load(path.read_text())
    config["online_store"]["key_ttl_seconds"] = seconds
    path.write_text(yaml.safe_dump(config))
    return fs.open_store(Path(store.repo_path))
