"""The prediction service on the production profile: registry in PostgreSQL, online features in Redis,
prediction log in PostgreSQL. Redis is a server of the test's own (started and stopped by pid), so the
test can take the feature store away while the service runs and bring it back."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import sqlalchemy as sa

from tests.conftest import make_home
from tests.integration.test_service import GOOD_ROW, _wait, start_service, stop_service
from tests.production.conftest import PG, PrivateRedis, production_variables

pytestmark = [pytest.mark.production, pytest.mark.integration, pytest.mark.slow,
              pytest.mark.usefixtures("prefect_harness")]  # fmt: skip


def test_service_on_redis_fails_fast_while_the_store_is_down_and_recovers(
    tmp_path: Path, pg_databases: dict[str, str], private_redis: PrivateRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flows.training import TrainingParams, training_pipeline
    from flywheel.datagen import GeneratorSpec, write_batches

    env = production_variables(pg_databases, f"127.0.0.1:{private_redis.port}")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    home = make_home(tmp_path / "home")
    write_batches(GeneratorSpec(seed=5, days=21, rows_per_day=300, customers=3000),
                  home / "data" / "incoming" / "churn")  # fmt: skip
    result = training_pipeline(TrainingParams(profile="production", config_dir=str(home / "configs")))
    assert (result.outcome, result.version) == ("champion", "1")

    features = pd.read_parquet(home / "data" / "offline" / "churn" / "features.parquet")
    ids = [int(i) for i in features["customer_id"].drop_duplicates().head(20)]
    svc = start_service(home, env, profile="production")
    request_ids = []
    try:
        assert _wait(lambda: svc.http.get("/health").status_code == 200, timeout=60), svc.http.get("/health").text
        before = svc.predict(entities=ids)
        assert before.status_code == 200, before.text
        assert {p["version"] for p in before.json()["predictions"]} == {"1"}
        assert any(not p["imputed"] for p in before.json()["predictions"]), "features came from Redis"
        request_ids.append(before.json()["request_id"])
        assert svc.predict(entities=[987_654_321]).status_code == 404

        private_redis.stop()  # the feature store goes away while the service runs
        health = _wait(lambda: (r := svc.http.get("/health")).status_code == 503 and r, timeout=30)
        assert health and any("feature store unavailable" in x for x in health.json()["reasons"]), health
        down = svc.predict(entities=ids[:1])
        assert down.status_code == 503 and "feature store unavailable" in down.json()["detail"], down.text
        assert "retried every" in down.json()["detail"], "refused from the known outage, not by trying the store"
        raw = svc.predict(rows=[GOOD_ROW])
        assert raw.status_code == 200, "raw rows need no feature store"
        request_ids.append(raw.json()["request_id"])

        private_redis.start()  # back, with its data (append-only file)
        assert _wait(lambda: svc.http.get("/health").status_code == 200, timeout=60), svc.http.get("/health").text
        after = svc.predict(entities=ids)
        assert after.status_code == 200, after.text
        assert [p["probability"] for p in after.json()["predictions"]] == [
            p["probability"] for p in before.json()["predictions"]], "same features, same answers after recovery"
        request_ids.append(after.json()["request_id"])
    finally:
        stop_service(svc)
    # the prediction log went to PostgreSQL through the writer process, nothing lost at stop
    engine = sa.create_engine(f"{PG}/{pg_databases['flywheel']}")
    try:
        with engine.connect() as conn:
            counts = dict(conn.execute(sa.text(
                "SELECT request_id, COUNT(*) FROM flywheel_predictions GROUP BY request_id")).all())
    finally:
        engine.dispose()
    assert [counts.get(r) for r in request_ids] == [len(ids), 1, len(ids)], counts
    assert "feature store unavailable" in svc.output()
