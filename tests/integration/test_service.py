"""The prediction service as a real process: real HTTP, real Feast online store (SQLite), real MLflow registry.

One trained project home for the module (two training runs: champion v1, then challenger v2), one
service process started on a free port and stopped by pid. Tests run in file order on that one
service; each leaves the routing policy and aliases as it found them (champion v1, challenger v2).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pandas as pd
import pytest
import sqlalchemy as sa

from flywheel.datagen import GeneratorSpec
from flywheel.rollout import RolloutError
from tests.conftest import PROJECT, make_home, train_champion_and_challenger
from tests.unit.test_apidocs import assert_docs_offline

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SPEC = GeneratorSpec(seed=11, days=28, rows_per_day=500, customers=6000)
TOKEN = "test-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
UNKNOWN_ID = 987_654_321


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def trained_home(tmp_path_factory: pytest.TempPathFactory, prefect_harness: None) -> Path:
    """A home whose registry holds champion v1 and challenger v2, with the online store materialized."""
    home = make_home(tmp_path_factory.mktemp("serve-home"))
    train_champion_and_challenger(home, SPEC)
    return home


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Service:
    def __init__(self, home: Path, port: int, proc: subprocess.Popen[bytes], log_path: Path) -> None:
        self.home, self.port, self.proc, self.log_path = home, port, proc, log_path
        self.url = f"http://127.0.0.1:{port}"
        self.http = httpx.Client(base_url=self.url, timeout=30)

    def predict(self, **body: Any) -> httpx.Response:
        return self.http.post("/predict", json=body)

    def admin(self, path: str, body: dict[str, Any] | None = None) -> httpx.Response:
        return self.http.post(path, json=body, headers=AUTH)

    def routing(self, **policy: Any) -> None:
        r = self.admin("/admin/routing", policy)
        assert r.status_code == 200, r.text

    def db(self) -> sa.Engine:
        return sa.create_engine(f"sqlite:///{self.home}/data/predictions.db")

    def log_rows(self, request_id: str, expect: int, timeout: float = 20) -> list[dict[str, Any]]:
        """Rows of one request once the background writer has flushed them."""
        engine = self.db()
        deadline = time.monotonic() + timeout
        try:
            while True:
                with engine.connect() as conn:
                    rows = [dict(r._mapping) for r in conn.execute(
                        sa.text("SELECT * FROM flywheel_predictions WHERE request_id = :r ORDER BY id"),
                        {"r": request_id})]
                if len(rows) >= expect or time.monotonic() > deadline:
                    return rows
                time.sleep(0.2)
        finally:
            engine.dispose()

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")


def start_service(
    home: Path, env_extra: dict[str, str] | None = None, timeout: float = 120, via_cli: bool = False,
    profile: str = "ci",
) -> Service:
    port = _free_port()
    log_path = home / f"service-{port}.log"
    env = {
        **os.environ,
        "FLYWHEEL_ADMIN_TOKEN": TOKEN,
        "FLYWHEEL_SERVE__REGISTRY_POLL_SECONDS": "0.5",
        "FLYWHEEL_SERVE__LOG_FLUSH_SECONDS": "0.2",
        # a fresh connection per registry call, so a database that goes away is noticed at once
        "MLFLOW_SQLALCHEMYSTORE_POOLCLASS": "NullPool",
        "PYTHONPATH": str(PROJECT),
        # what `import feast` in a parent process leaves its children (a temp folder it deletes at exit):
        # set here, not inherited, because an in-process import of flywheel.service elsewhere removes it
        "PROMETHEUS_MULTIPROC_DIR": str(home / "feast-prometheus-multiproc"),
        **(env_extra or {}),
    }
    with log_path.open("wb") as out:
        entry = [str(Path(sys.executable).parent / "flywheel"), "serve"] if via_cli else [
            sys.executable, "-m", "flywheel.service"]
        proc = subprocess.Popen(
            [*entry, "--config-dir", str(home / "configs"), "--profile", profile, "--port", str(port)],
            cwd=str(PROJECT), env=env, stdout=out, stderr=subprocess.STDOUT,
        )
    svc = Service(home, port, proc, log_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"service exited with {proc.returncode}:\n{svc.output()[-4000:]}")
        try:
            svc.http.get("/health", timeout=2)
            return svc
        except httpx.TransportError:
            time.sleep(0.3)
    stop_service(svc)
    raise AssertionError(f"service did not answer within {timeout}s:\n{svc.output()[-4000:]}")


def stop_service(svc: Service, timeout: float = 30) -> int | None:
    svc.http.close()
    if svc.proc.poll() is None:
        os.kill(svc.proc.pid, signal.SIGTERM)
        try:
            svc.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(svc.proc.pid, signal.SIGKILL)
            svc.proc.wait(10)
    return svc.proc.returncode


@pytest.fixture(scope="module")
def service(trained_home: Path) -> Iterator[Service]:
    svc = start_service(trained_home)
    try:
        yield svc
    finally:
        stop_service(svc)


@pytest.fixture(scope="module")
def registry(trained_home: Path):
    from flywheel.audit import AuditLog
    from flywheel.registry import Registry
    from flywheel.runtime import start_run_context

    ctx = start_run_context("ci", trained_home / "configs")
    return Registry(ctx.tracking_uri, AuditLog(ctx.audit_db_url))


@pytest.fixture(scope="module")
def latest_features(trained_home: Path) -> pd.DataFrame:
    """The newest offline feature row of each entity (what materialization put online)."""
    df = pd.read_parquet(trained_home / "data" / "offline" / "churn" / "features.parquet")
    df = df.sort_values(["event_timestamp", "ingested_at"], kind="stable")
    counts = df.groupby("customer_id")["event_timestamp"].transform(lambda s: (s == s.max()).sum())
    df = df[counts == 1]  # entities whose newest row is unambiguous
    return df.groupby("customer_id").tail(1).set_index("customer_id")


def _restore_aliases(service: Service, registry: Any) -> None:
    """Back to the module's starting point: champion v1, challenger v2, both loaded."""
    registry.move_alias("churn", "champion", "1", "restore", "test")
    registry.move_alias("churn", "challenger", "2", "restore", "test")
    assert service.admin("/admin/reload").json()["serving"] == {"champion": "1", "challenger": "2"}


def _wait(predicate: Any, timeout: float = 20, every: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(every)


# ---------------------------------------------------------------------------------------------- tests


def test_health_is_ready_with_both_slots(service: Service) -> None:
    r = service.http.get("/health")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "ready" and body["reasons"] == []
    assert body["models"]["champion"]["version"] == "1"
    assert body["models"]["challenger"]["version"] == "2"
    assert body["models"]["champion"]["feature_service"].startswith("churn_")
    assert_docs_offline(service.http)
    assert "/predict" in service.http.get("/openapi.json").json()["paths"]


def test_predict_by_entity_single_and_batch(service: Service, latest_features: pd.DataFrame) -> None:
    ids = [int(i) for i in latest_features.index[:25]]
    one = service.predict(entities=ids[:1])
    assert one.status_code == 200, one.text
    (p,) = one.json()["predictions"]
    assert p["entity"] == ids[0] and p["model"] == "churn" and p["version"] == "1" and p["arm"] == "champion"
    assert 0.0 <= p["probability"] <= 1.0 and p["prediction"] == (p["probability"] >= 0.5)

    batch = service.predict(entities=ids)
    assert batch.status_code == 200, batch.text
    preds = batch.json()["predictions"]
    assert [q["entity"] for q in preds] == ids
    assert preds[0]["probability"] == pytest.approx(p["probability"])
    assert {q["version"] for q in preds} == {"1"}


def test_prediction_log_rows_and_raw_rows_match_entity_predictions(
    service: Service, latest_features: pd.DataFrame
) -> None:
    ids = [int(i) for i in latest_features.index[30:35]]
    r = service.predict(entities=ids)
    assert r.status_code == 200, r.text
    body = r.json()
    rows = service.log_rows(body["request_id"], expect=len(ids))
    assert [int(x["entity"]) for x in rows] == ids
    for row, pred in zip(rows, body["predictions"], strict=True):
        assert (row["model"], row["version"], row["arm"]) == ("churn", "1", "champion")
        assert row["probability"] == pytest.approx(pred["probability"])
        assert bool(row["prediction"]) == pred["prediction"] and not row["shadow"]
        assert row["latency_ms"] > 0 and row["at"]
    # the features used, as logged, are the online values of the entity
    features = [json.loads(row["features"]) for row in rows]
    expected = latest_features.loc[ids[0]]
    assert features[0]["tenure_months"] == expected["tenure_months"]
    assert features[0]["contract_type"] == expected["contract_type"]

    # the same values sent as raw rows give the same probabilities
    raw = service.predict(rows=features)
    assert raw.status_code == 200, raw.text
    got = [q["probability"] for q in raw.json()["predictions"]]
    assert got == pytest.approx([q["probability"] for q in body["predictions"]], abs=1e-12)
    assert all(q["entity"] is None for q in raw.json()["predictions"])


def test_unknown_entity_is_404_naming_it(service: Service, latest_features: pd.DataFrame) -> None:
    known = int(latest_features.index[0])
    r = service.predict(entities=[known, UNKNOWN_ID])
    assert r.status_code == 404, r.text
    assert str(UNKNOWN_ID) in r.json()["detail"] and r.json()["unknown_ids"] == [UNKNOWN_ID]


def test_sparse_entity_is_served_with_imputed_features(service: Service, latest_features: pd.DataFrame) -> None:
    sparse = latest_features[latest_features["avg_session_minutes"].isna() & latest_features["payment_method"].notna()]
    assert not sparse.empty, "the generator leaves ~2% of avg_session_minutes missing"
    entity = int(sparse.index[0])
    r = service.predict(entities=[entity])
    assert r.status_code == 200, r.text
    (p,) = r.json()["predictions"]
    assert p["imputed"] == ["avg_session_minutes"] and 0 <= p["probability"] <= 1
    full = int(latest_features[latest_features.notna().all(axis=1)].index[0])
    assert service.predict(entities=[full]).json()["predictions"][0]["imputed"] == []


GOOD_ROW = {
    "tenure_months": 12, "monthly_charges": 70.5, "support_tickets_30d": 2, "avg_session_minutes": 45.0,
    "payment_delay_days": 3, "num_products": 2, "contract_type": "monthly", "payment_method": "card",
    "region": "north", "segment": "consumer",
}


@pytest.mark.parametrize(
    ("content", "status", "needle"),
    [
        (b'{"entities": [1, 2', 422, "malformed JSON"),
        (b'{"entities": []}', 422, "entities"),
        (b'{"entities": [1], "rows": [{}]}', 422, "exactly one"),
        (b'{"entities": ["abc"]}', 422, "integer"),
        (b'{"entities": [true]}', 422, "entities"),
        (b'{"entities": [99999999999999999999999]}', 422, "64-bit"),
        (b'{"entities": [1], "colour": "red"}', 422, "colour"),
        (json.dumps({"rows": [{k: v for k, v in GOOD_ROW.items() if k != "region"}]}).encode(), 422, "region"),
        (json.dumps({"rows": [{**GOOD_ROW, "shoe_size": 44}]}).encode(), 422, "shoe_size"),
        (json.dumps({"rows": [{**GOOD_ROW, "tenure_months": "ten"}]}).encode(), 422, "tenure_months"),
        (json.dumps({"rows": [{**GOOD_ROW, "contract_type": 3}]}).encode(), 422, "contract_type"),
        (json.dumps({"rows": [{**GOOD_ROW, "contract_type": "weekly"}]}).encode(), 422, "weekly"),
        (json.dumps({"rows": [{**GOOD_ROW, "monthly_charges": float("nan")}]}).encode(), 422, "finite"),
        (json.dumps({"rows": [{**GOOD_ROW, "region": None}]}).encode(), 422, "region"),
        (b'{"rows": "nope"}', 422, "rows"),
        (b"[1, 2, 3]", 422, "body"),
        (json.dumps({"entities": list(range(1, 1002))}).encode(), 413, "max_batch"),
    ],
)
def test_bad_input_is_a_clear_4xx(service: Service, content: bytes, status: int, needle: str) -> None:
    r = service.http.post("/predict", content=content, headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    assert needle in r.text


def test_raw_row_with_nulls_is_imputed(service: Service) -> None:
    r = service.predict(rows=[{**GOOD_ROW, "avg_session_minutes": None, "payment_method": None}])
    assert r.status_code == 200, r.text
    assert r.json()["predictions"][0]["imputed"] == ["avg_session_minutes", "payment_method"]


def test_a_raw_row_naming_its_snapshot_logs_it_as_feature_time(service: Service) -> None:
    """A raw row may name the feature snapshot it is (the dataset's timestamp): logged as its feature_time, so
    its outcome can join it later; a row that names none logs none."""
    named = {**GOOD_ROW, "customer_id": 7, "event_timestamp": "2026-03-01T00:00:00Z"}
    r = service.predict(rows=[named, GOOD_ROW])
    assert r.status_code == 200, r.text
    rows = service.log_rows(r.json()["request_id"], expect=2)
    assert pd.Timestamp(rows[0]["feature_time"]).tz_localize(None) == pd.Timestamp("2026-03-01"), rows[0]
    assert rows[0]["entity"] == "7" and rows[1]["feature_time"] is None
    assert "event_timestamp" not in json.loads(rows[0]["features"]), "the snapshot time is not a feature"
    bad = service.predict(rows=[{**GOOD_ROW, "event_timestamp": "2026-03-01"}])
    assert bad.status_code == 422 and "no UTC offset" in bad.text, bad.text


def test_admin_endpoints_need_the_token(service: Service) -> None:
    assert service.http.post("/admin/reload").status_code == 401
    assert service.http.post("/admin/reload", headers={"Authorization": "Bearer wrong"}).status_code == 401
    r = service.admin("/admin/reload")
    assert r.status_code == 200, r.text
    assert r.json()["serving"] == {"champion": "1", "challenger": "2"}
    bad = service.admin("/admin/routing", {"mode": "canary", "share": 1.5})
    assert bad.status_code == 422 and "share" in bad.text


def test_flush_log_stores_the_rows_before_answering_or_names_why_not(
    trained_home: Path, latest_features: pd.DataFrame, monkeypatch: pytest.MonkeyPatch
) -> None:
    """POST /admin/flush-log on a service whose writer would otherwise store rows only once a minute."""
    from tasks.rollout import ServiceClient

    db = trained_home / "data" / "flush-log.db"  # its own log: the table is taken away below
    svc = start_service(trained_home, {"FLYWHEEL_SERVE__LOG_FLUSH_SECONDS": "60",
                                       "FLYWHEEL_SERVE__PREDICTION_LOG_URL": f"sqlite:///{db}"})
    engine = sa.create_engine(f"sqlite:///{db}")

    def stored(request_id: str) -> int:  # read once, no waiting
        with engine.connect() as conn:
            return conn.execute(sa.text("SELECT COUNT(*) FROM flywheel_predictions WHERE request_id = :r"),
                                {"r": request_id}).scalar_one()

    ids = [int(i) for i in latest_features.index[:20]]
    try:
        assert svc.http.post("/admin/flush-log").status_code == 401
        assert svc.http.post("/admin/flush-log", headers={"Authorization": "Bearer wrong"}).status_code == 401
        first = svc.predict(entities=ids).json()["request_id"]
        r = svc.admin("/admin/flush-log", {"timeout_s": 30})
        assert r.status_code == 200, r.text
        assert r.json()["written"] >= len(ids) and r.json()["dropped"] == 0, r.json()
        assert stored(first) == len(ids), "the rows are readable as soon as the call returns"

        # a writer that does not answer (stopped): 504 naming it; the rollout's client turns it into an error
        writer = svc.http.get("/health").json()["prediction_log"]["writer_pid"]
        second = svc.predict(entities=ids).json()["request_id"]
        os.kill(writer, signal.SIGSTOP)
        try:
            r = svc.admin("/admin/flush-log", {"timeout_s": 0.5})
            assert r.status_code == 504 and f"writer (pid {writer}) did not acknowledge" in r.json()["detail"], r.text
            monkeypatch.setenv("FLYWHEEL_ADMIN_TOKEN", TOKEN)
            client = ServiceClient(svc.url, "FLYWHEEL_ADMIN_TOKEN")
            with pytest.raises(RolloutError, match=r"did not confirm its prediction log was stored \(504: "):
                client.flush_log(0.5)
            client.close()
        finally:
            os.kill(writer, signal.SIGCONT)
        assert svc.admin("/admin/flush-log").status_code == 200 and stored(second) == len(ids)

        # the database refuses the rows (their table is gone): 503 naming the error; kept, stored once it is back
        with engine.begin() as conn:
            conn.execute(sa.text("ALTER TABLE flywheel_predictions RENAME TO flywheel_predictions_away"))
        third = svc.predict(entities=ids).json()["request_id"]
        r = svc.admin("/admin/flush-log")
        assert r.status_code == 503, r.text
        assert "refused the write" in r.json()["detail"] and "no such table" in r.json()["detail"], r.text
        assert f"{len(ids)} rows kept" in r.json()["detail"], r.text
        with engine.begin() as conn:
            conn.execute(sa.text("ALTER TABLE flywheel_predictions_away RENAME TO flywheel_predictions"))
        assert svc.admin("/admin/flush-log").status_code == 200 and stored(third) == len(ids)
    finally:
        engine.dispose()
        stop_service(svc)


def test_canary_share_and_stickiness(service: Service, latest_features: pd.DataFrame) -> None:
    ids = [int(i) for i in latest_features.index[:1000]]
    service.routing(mode="canary", share=0.3)
    try:
        assert service.http.get("/routing").json()["policy"] == {"mode": "canary", "share": 0.3, "active": "champion"}
        first = service.predict(entities=ids).json()["predictions"]
        arms = Counter(p["arm"] for p in first)
        assert 0.25 <= arms["challenger"] / len(ids) <= 0.35, arms
        assert all(p["version"] == ("2" if p["arm"] == "challenger" else "1") for p in first)
        again = service.predict(entities=ids[::-1][:200]).json()["predictions"]
        by_id = {p["entity"]: p["arm"] for p in first}
        assert all(by_id[p["entity"]] == p["arm"] for p in again), "the same entity always gets the same arm"
        # the routing policy is persisted for a restart
        with service.db().connect() as conn:
            stored = conn.execute(sa.text("SELECT policy FROM flywheel_routing WHERE model = 'churn'")).scalar_one()
        assert json.loads(stored)["mode"] == "canary"
    finally:
        service.routing(mode="single")


def test_blue_green_switch(service: Service, latest_features: pd.DataFrame) -> None:
    ids = [int(i) for i in latest_features.index[:50]]
    service.routing(mode="blue_green", active="challenger")
    try:
        assert {(p["arm"], p["version"]) for p in service.predict(entities=ids).json()["predictions"]} == {
            ("challenger", "2")}
        service.routing(mode="blue_green", active="champion")
        assert {(p["arm"], p["version"]) for p in service.predict(entities=ids).json()["predictions"]} == {
            ("champion", "1")}
    finally:
        service.routing(mode="single")


def test_shadow_scores_in_background_and_logs(service: Service, latest_features: pd.DataFrame) -> None:
    ids = [int(i) for i in latest_features.index[100:140]]
    service.routing(mode="shadow", share=1.0)
    try:
        r = service.predict(entities=ids)
        assert r.status_code == 200
        assert {(p["arm"], p["version"]) for p in r.json()["predictions"]} == {("champion", "1")}
        rows = service.log_rows(r.json()["request_id"], expect=2 * len(ids))
        shadow = [x for x in rows if x["shadow"]]
        assert len(shadow) == len(ids)
        assert {(x["arm"], x["version"]) for x in shadow} == {("challenger", "2")}
        assert sorted(int(x["entity"]) for x in shadow) == sorted(ids)
    finally:
        service.routing(mode="single")


def test_explanations_aggregate_to_raw_features(service: Service, latest_features: pd.DataFrame) -> None:
    ids = [int(i) for i in latest_features.index[200:202]]
    plain = service.predict(entities=ids).json()["predictions"]
    assert all(p["explanation"] is None for p in plain)
    r = service.predict(entities=ids, explain=True)
    assert r.status_code == 200, r.text
    raw_features = set(GOOD_ROW)
    for p in r.json()["predictions"]:
        ex = p["explanation"]
        assert ex["method"] in ("shap_linear", "shap_tree", "occlusion")
        names = [c["feature"] for c in ex["contributions"]]
        assert set(names) <= raw_features and len(names) == len(set(names)), names  # no one-hot columns
        mags = [abs(c["contribution"]) for c in ex["contributions"]]
        assert mags == sorted(mags, reverse=True) and mags[0] > 0
        if ex["unit"] == "log_odds" and ex["base_value"] is not None and len(names) == len(raw_features):
            # SHAP is additive: base + contributions = the model's log-odds
            import math

            logit = math.log(p["probability"] / (1 - p["probability"]))
            assert ex["base_value"] + sum(c["contribution"] for c in ex["contributions"]) == pytest.approx(
                logit, abs=1e-6)
    logged = service.log_rows(r.json()["request_id"], expect=2)
    assert all(json.loads(x["explanation"])["contributions"] for x in logged)


def test_metrics_count_requests_per_version_and_arm(service: Service) -> None:
    text = service.http.get("/metrics").text
    assert 'flywheel_predictions_total{arm="champion",model="churn",shadow="false",version="1"}' in text
    assert 'flywheel_predictions_total{arm="challenger",model="churn",shadow="true",version="2"}' in text
    assert "flywheel_predict_seconds_bucket" in text
    assert 'flywheel_model_loaded{arm="challenger",version="2"} 1.0' in text
    assert 'flywheel_http_requests_total{method="POST",path="/predict",status="404"}' in text
    # the monitoring history (empty here) was read from the project database at this scrape
    assert "flywheel_monitoring_up 1.0" in text
    # the service was started with PROMETHEUS_MULTIPROC_DIR set, as Feast leaves it for children
    # (start_service): it keeps its metrics in memory all the same (no files, no warning per scrape)
    assert service.http.get("/metrics").status_code == 200
    assert "multi-process mode" not in service.output()


def test_hot_swap_under_load_drops_nothing(service: Service, registry: Any, latest_features: pd.DataFrame) -> None:
    ids = [int(i) for i in latest_features.index[:20]]
    stop = threading.Event()
    seen: list[tuple[int, str]] = []
    lock = threading.Lock()

    def hammer(k: int) -> None:
        with httpx.Client(base_url=service.url, timeout=30) as client:
            i = 0
            while not stop.is_set():
                r = client.post("/predict", json={"entities": [ids[(k + i) % len(ids)]]})
                with lock:
                    seen.append((r.status_code, r.json()["predictions"][0]["version"] if r.status_code == 200 else ""))
                i += 1

    threads = [threading.Thread(target=hammer, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)
        registry.move_alias("churn", "champion", "2", "hot swap test", "test")
        r = service.admin("/admin/reload")
        assert r.status_code == 200 and r.json()["serving"]["champion"] == "2", r.text
        mark = len(seen)
        time.sleep(1.0)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    try:
        statuses = Counter(s for s, _ in seen)
        assert statuses == {200: len(seen)}, statuses
        versions = [v for _, v in seen]
        assert "1" in versions[:mark] and set(versions[mark + 8:]) == {"2"}, Counter(versions)
    finally:
        _restore_aliases(service, registry)


def test_tampered_artifact_is_refused_and_previous_model_serves(
    service: Service, registry: Any, latest_features: pd.DataFrame
) -> None:
    import mlflow.artifacts

    uri = registry.client.get_model_version_download_uri("churn", "2")
    local = Path(uri.removeprefix("file://"))
    if not local.exists():
        local = Path(mlflow.artifacts.download_artifacts(uri, tracking_uri=registry.tracking_uri))
    skops_file = next(local.rglob("*.skops"))
    original = skops_file.read_bytes()
    ids = [int(latest_features.index[0])]
    try:
        skops_file.write_bytes(original + b"tampered")
        registry.move_alias("churn", "champion", "2", "tamper test", "test")
        r = service.admin("/admin/reload")
        assert r.status_code == 200
        refused = r.json()["refused"]["champion"]
        assert refused["version"] == "2" and "digests" in refused["reason"], refused
        health = service.http.get("/health")
        assert health.status_code == 200 and health.json()["refused"]["champion"]["version"] == "2"
        p = service.predict(entities=ids).json()["predictions"][0]
        assert (p["version"], p["arm"]) == ("1", "champion")
        assert "refused churn v2" in service.output()
    finally:
        skops_file.write_bytes(original)
        _restore_aliases(service, registry)


def test_registry_outage_turns_health_unready_and_recovers(
    service: Service, trained_home: Path, latest_features: pd.DataFrame
) -> None:
    db = trained_home / "data" / "mlflow.db"
    away = trained_home / "data" / "mlflow.db.away"
    ids = [int(latest_features.index[0])]
    os.replace(db, away)
    db.mkdir()  # a directory where the database was: every connection fails, none gets created
    try:
        h = _wait(lambda: (r := service.http.get("/health")).status_code == 503 and r)
        assert h, "health stays ready with the registry gone"
        assert any("registry unreachable" in reason for reason in h.json()["reasons"]), h.json()
        # fail fast: nobody can tell which version should answer (serve.on_registry_outage=refuse)
        r = service.predict(entities=ids)
        assert r.status_code == 503 and "registry unreachable" in r.json()["detail"], r.text
    finally:
        db.rmdir()
        os.replace(away, db)
    assert _wait(lambda: service.http.get("/health").status_code == 200), "did not recover"
    assert service.predict(entities=ids).status_code == 200


def test_stores_unreachable_at_start_fail_fast_then_recover_and_log_flushes_on_stop(
    service: Service, trained_home: Path, latest_features: pd.DataFrame
) -> None:
    from flywheel.featurestore import render_repo
    from flywheel.settings import load_settings

    service.routing(mode="blue_green", active="champion")  # persisted: the new process must start with it
    data = trained_home / "data"
    registry_dir, online_dir = data / "late-registry", data / "late-online"
    for blocker in (registry_dir, online_dir):
        blocker.write_text("not a folder")  # the store's folder can be neither opened nor created
    # started through the CLI; a long flush interval: what lands in the log below was flushed at stop
    svc = start_service(trained_home, {
        "FLYWHEEL_STORES__MLFLOW_TRACKING_URI": f"sqlite:///{registry_dir}/mlflow.db",
        "FLYWHEEL_STORES__FEAST_ONLINE__PATH": str(online_dir / "online_store.db"),
        "FLYWHEEL_SERVE__LOG_FLUSH_SECONDS": "60",
    }, via_cli=True)
    ids = [int(i) for i in latest_features.index[:10]]
    request_ids = []
    try:
        r = svc.http.get("/health")
        assert r.status_code == 503, r.text
        reasons = " ".join(r.json()["reasons"])
        assert "registry unreachable" in reasons and "feature store unavailable" in reasons, reasons
        p = svc.predict(entities=ids[:1])
        assert p.status_code == 503 and "no model loaded" in p.json()["detail"]

        registry_dir.unlink()
        registry_dir.symlink_to(data, target_is_directory=True)  # the registry comes back
        assert _wait(lambda: svc.http.get("/health").json()["models"]["champion"], timeout=60)
        p = svc.predict(entities=ids[:1])
        assert p.status_code == 503 and "feature store" in p.json()["detail"], p.text
        assert svc.predict(rows=[GOOD_ROW]).status_code == 200, "raw rows need no feature store"

        online_dir.unlink()
        online_dir.symlink_to(data, target_is_directory=True)  # the online store comes back
        assert _wait(lambda: svc.http.get("/health").status_code == 200, timeout=60), svc.http.get("/health").text
        # the routing policy set through the other process was persisted and is picked up at start
        assert svc.http.get("/routing").json()["policy"] == {"mode": "blue_green", "share": 0.0, "active": "champion"}
        for i in ids:
            r = svc.predict(entities=[i])
            assert r.status_code == 200 and r.json()["predictions"][0]["version"] == "1", r.text
            request_ids.append(r.json()["request_id"])
    finally:
        # uvicorn re-raises the signal it handled once shutdown is complete
        code = stop_service(svc)
        for blocker in (registry_dir, online_dir):
            if blocker.is_symlink() or blocker.exists():
                blocker.unlink()
        render_repo(load_settings("ci", trained_home / "configs", environ={}).stores, trained_home)
        service.routing(mode="single")
    assert code in (0, -signal.SIGTERM) and "Application shutdown complete" in svc.output(), svc.output()[-3000:]
    engine = sa.create_engine(f"sqlite:///{trained_home}/data/predictions.db")
    with engine.connect() as conn:
        found = conn.execute(
            sa.text("SELECT COUNT(*) FROM flywheel_predictions WHERE request_id IN :ids").bindparams(
                sa.bindparam("ids", expanding=True)), {"ids": request_ids}).scalar_one()
    engine.dispose()
    assert found == len(ids), "a clean stop flushes every queued prediction"
