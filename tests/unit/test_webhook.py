"""flywheel/webhook.py without a Prefect server: what it imports, its settings, the bodies it accepts, the
event it builds (checked against Prefect's own schema), and the deliveries table on real databases."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from flywheel import migrations
from flywheel.errors import ConfigError
from flywheel.settings import load_settings
from flywheel.trigger_policy import TriggerPolicy
from flywheel.triggers import History, decide
from flywheel.webhook import (
    DELIVERIES_TABLE,
    HOOKS,
    BatchLandedBody,
    Claimed,
    Delivery,
    DeliveryStore,
    RetrainBody,
    body_problems,
    build_event,
    event_id_for,
    retrain_event_id,
    retrain_signal_id,
)
from tests.conftest import PROJECT

T0 = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def test_the_receiver_imports_only_the_core() -> None:
    code = ("import json, sys, time; t = time.perf_counter(); import flywheel.webhook\n"
            "print(json.dumps({'seconds': time.perf_counter() - t, 'modules': sorted(sys.modules)}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=PROJECT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    top = {m.split(".")[0] for m in result["modules"]}
    assert not top & {"prefect", "mlflow", "feast", "sklearn", "pandas", "numpy", "great_expectations", "evidently",
                      "shap", "onnxruntime", "tasks", "flows"}
    ours = {m for m in result["modules"] if m.startswith("flywheel.")}
    # the trigger decisions store and its pure rules: a retrain request is recorded as a decision
    assert ours == {"flywheel.webhook", "flywheel.hmacsig", "flywheel.migrations", "flywheel.db", "flywheel.errors",
                    "flywheel.trigger_decisions", "flywheel.triggers", "flywheel.trigger_policy", "flywheel.clock",
                    "flywheel.landing", "flywheel.apidocs", "flywheel.outbox",
                    "flywheel.liveness"}
    print(f"import flywheel.webhook: {result['seconds']:.2f} s")


# ---------------------------------------------------------------------------------------------- settings


def test_settings_section_defaults_and_the_secret_variables_are_not_settings_keys(home: Path) -> None:
    env = {"FLYWHEEL_WEBHOOK_SECRET": "s" * 20, "FLYWHEEL_WEBHOOK_SECRET_PREVIOUS": "p" * 20,
           "FLYWHEEL_WEBHOOK__PORT": "9001"}
    s = load_settings("ci", home / "configs", environ=env)
    wh = s.webhook
    assert (wh.host, wh.port, wh.max_body_bytes, wh.tolerance_s) == ("127.0.0.1", 9001, 65536, 300)
    assert (wh.secret_env, wh.previous_secret_env) == ("FLYWHEEL_WEBHOOK_SECRET", "FLYWHEEL_WEBHOOK_SECRET_PREVIOUS")
    assert s.webhook_deliveries_url == s.audit_db_url  # beside the audit log unless told otherwise
    assert "s" * 20 not in s.model_dump_json()  # the secret itself never enters the settings tree
    other = load_settings("ci", home / "configs", environ={"FLYWHEEL_WEBHOOK__DELIVERIES_DB_URL": "sqlite:///{home}/h.db"})
    assert other.webhook_deliveries_url == f"sqlite:///{home}/h.db"


@pytest.mark.parametrize(("key", "value", "reason"), [
    ("FLYWHEEL_WEBHOOK__SECRET_ENV", "FLYWHEEL_HOOK_KEY", "FLYWHEEL_\\* variables are settings keys"),
    ("FLYWHEEL_WEBHOOK__SECRET_ENV", "not a name", "is not an environment variable name"),
    ("FLYWHEEL_WEBHOOK__PREVIOUS_SECRET_ENV", "FLYWHEEL_WEBHOOK_SECRET", "must name different variables"),
    ("FLYWHEEL_WEBHOOK__TOLERANCE_S", "0", "greater than or equal to 1"),
    ("FLYWHEEL_WEBHOOK__MAX_BODY_BYTES", "10", "greater than or equal to 1024"),
    ("FLYWHEEL_WEBHOOK__SECRET", "oops", "Extra inputs are not permitted"),
])
def test_bad_webhook_settings_fail_at_load_naming_the_key(home: Path, key: str, value: str, reason: str) -> None:
    with pytest.raises(ConfigError, match=reason) as err:
        load_settings("ci", home / "configs", environ={key: value})
    assert key in str(err.value)


# ------------------------------------------------------------------------------------------ bodies, event


@pytest.mark.parametrize(("model", "raw", "problem"), [
    (RetrainBody, b"{}", "reason: Field required"),
    (RetrainBody, b'{"reason": 5}', "reason: Input should be a valid string"),
    (RetrainBody, b'{"reason": ""}', "reason: String should have at least 1 character"),
    (RetrainBody, b'{"reason": "' + b"r" * 501 + b'"}', "reason: String should have at most 500"),
    (RetrainBody, b'{"reason": "a\\u0000b"}', "reason: Value error, must not contain control characters"),
    (RetrainBody, b'{"reason": "x", "model": "../etc"}', "model: Value error, must be 1-64 characters"),
    (RetrainBody, b'{"reason": "x", "colour": "red"}', "colour: Extra inputs are not permitted"),
    (RetrainBody, b'{"reason": "x"', "malformed JSON: EOF while parsing"),
    (RetrainBody, b"\xff\xfe", "malformed JSON"),
    (RetrainBody, b'["reason"]', "body: Input should be an object"),
    (BatchLandedBody, b'{"dataset": "churn"}', "uri: Field required"),
    (BatchLandedBody, b'{"dataset": "churn", "uri": "a b"}', "uri: Value error, must be a path or URI"),
    (BatchLandedBody, b'{"dataset": "churn", "uri": "x", "rows": -1}', "rows: Input should be greater than"),
    (BatchLandedBody, b'{"dataset": "churn", "uri": "x", "rows": "7"}', "rows: Input should be a valid integer"),
])
def test_bodies_name_the_field_that_is_wrong(model: type, raw: bytes, problem: str) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as err:
        model.model_validate_json(raw)
    assert any(p.startswith(problem) for p in body_problems(err.value)), body_problems(err.value)


def test_events_have_the_rest_shape_of_prefects_event_and_a_deterministic_id() -> None:
    from prefect.server.events.schemas.events import Event  # the server's own model of POST /api/events items

    retrain = build_event(HOOKS["retrain"], RetrainBody(reason="drift"), "d-1", T0, "churn")
    assert retrain == {
        "id": str(uuid.uuid5(uuid.UUID("6b1f6f0e-3c52-5d0a-9a57-0f1e7c0d2a41"), "d-1")),
        "occurred": T0.isoformat(),
        "event": "flywheel.retrain.requested",
        "resource": {"prefect.resource.id": "flywheel.model.churn", "prefect.resource.name": "churn",
                     "flywheel.model": "churn"},
        "payload": {"reason": "drift", "model": "churn", "delivery": "d-1"},
    }
    landed = build_event(HOOKS["labels-landed"], BatchLandedBody(dataset="churn", uri="s3://b/l.parquet", rows=3),
                         "d-2", T0, "churn")
    assert landed["event"] == "flywheel.labels.landed"
    assert landed["resource"]["prefect.resource.id"] == "flywheel.dataset.churn"
    assert landed["payload"] == {"dataset": "churn", "uri": "s3://b/l.parquet", "rows": 3, "delivery": "d-2"}
    for event in (retrain, landed):
        assert str(Event.model_validate(event).id) == event["id"]
    assert event_id_for("d-1") == event_id_for("d-1") != event_id_for("d-2")
    # a retrain's event is its trigger decision's: that id, and the decision named in the payload
    from flywheel.triggers import request_signal

    decision = decide(request_signal(model="churn", reason="drift", actor="webhook", source="webhook",
                                     event_id=retrain_signal_id("d-1"), occurred=T0), History(), TriggerPolicy(),
                      False, T0)
    decided = build_event(HOOKS["retrain"], RetrainBody(reason="drift"), "d-1", T0, "churn", decision)
    assert decided["id"] == decision.id == retrain_event_id("d-1")
    assert decided["payload"] == {"reason": "drift", "model": "churn", "delivery": "d-1", "decision_id": decision.id,
                                  "kind": "retrain_requested"}
    assert str(Event.model_validate(decided).id) == decision.id
    assert {h.event for h in HOOKS.values()} == {"flywheel.retrain.requested", "flywheel.data.landed",
                                                 "flywheel.labels.landed"}


# ------------------------------------------------------------------------------------------ deliveries


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database of this test's own (dropped after); skipped when PostgreSQL is absent."""
    from tests.production.conftest import throwaway_database

    with throwaway_database("flywheel_hooks", migrate=True) as url:
        yield url


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.production)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[DeliveryStore]:
    url = f"sqlite:///{tmp_path}/flywheel.db" if request.param == "sqlite" else request.getfixturevalue("pg_url")
    s = DeliveryStore(url, lease_s=30)
    yield s
    s.dispose()


def _delivery(sha: str = "a" * 64, endpoint: str = "retrain") -> Delivery:
    did = f"t-{uuid.uuid4().hex[:12]}"
    return Delivery(did, endpoint, sha, "flywheel.retrain.requested", str(event_id_for(did)), "current")


def _event(d: Delivery) -> dict:
    return build_event(HOOKS["retrain"], RetrainBody(reason="r"), d.delivery_id, T0, "churn")


def test_a_delivery_is_claimed_once_then_queued_then_emitted_and_a_duplicate_throughout(
        store: DeliveryStore) -> None:
    d = _delivery()
    first = store.claim(d, T0)
    assert isinstance(first, Claimed)
    busy = store.claim(d, T0 + timedelta(seconds=1))  # being recorded elsewhere: the row, not a claim
    assert not isinstance(busy, Claimed) and busy.outcome == "claimed"
    assert store.queue(d.delivery_id, first.token, T0 + timedelta(seconds=1), _event(d))
    queued = store.claim(d, T0 + timedelta(days=3))  # across any time and restart: still the same delivery
    assert not isinstance(queued, Claimed) and (queued.outcome, queued.event_id) == ("pending", d.event_id)
    assert store.backlog() == (1, T0)
    (due,) = store.due(T0 + timedelta(seconds=1), 10)
    assert (due.delivery_id, due.event, due.send_attempts) == (d.delivery_id, _event(d), 0)
    store.mark_emitted([d.delivery_id], T0 + timedelta(seconds=2))
    seen = store.claim(d, T0 + timedelta(days=3))
    assert not isinstance(seen, Claimed)
    assert (seen.outcome, seen.event_id, seen.attempts, seen.endpoint) == ("emitted", d.event_id, 1, "retrain")
    assert store.backlog() == (0, None) and store.due(T0 + timedelta(days=3), 10, everything=True) == []
    other_body = store.claim(Delivery(d.delivery_id, "retrain", "b" * 64, d.event, d.event_id, "current"), T0)
    assert not isinstance(other_body, Claimed) and other_body.body_sha256 == "a" * 64  # the caller answers 409


def test_a_failed_delivery_is_taken_again_by_the_retry(store: DeliveryStore) -> None:
    d = _delivery()
    first = store.claim(d, T0)
    store.fail(d.delivery_id, first.token, T0, "decisions database unavailable")
    assert store.get(d.delivery_id).outcome == "failed"
    retry = store.claim(d, T0 + timedelta(seconds=10))
    assert isinstance(retry, Claimed) and retry.received_at == first.received_at  # the event keeps its time
    assert not store.queue(d.delivery_id, first.token, T0, _event(d))  # the first request's claim is void
    assert store.get(d.delivery_id).outcome == "claimed"
    assert store.queue(d.delivery_id, retry.token, T0 + timedelta(seconds=11), _event(d))
    row = store.get(d.delivery_id)
    assert (row.outcome, row.attempts, row.detail) == ("pending", 2, None)


def test_a_failed_send_stays_pending_until_its_back_off_is_due(store: DeliveryStore) -> None:
    d = _delivery()
    claim = store.claim(d, T0)
    store.queue(d.delivery_id, claim.token, T0, _event(d))
    store.mark_retry([(d.delivery_id, 1, T0 + timedelta(seconds=5))], T0, "Prefect unreachable")
    assert store.due(T0 + timedelta(seconds=4), 10) == []
    assert [p.send_attempts for p in store.due(T0 + timedelta(seconds=5), 10)] == [1]
    assert len(store.due(T0, 10, everything=True)) == 1  # a start resends whatever is pending
    row = store.get(d.delivery_id)
    assert (row.outcome, row.detail) == ("pending", "Prefect unreachable")


def test_a_pending_delivery_whose_request_died_is_taken_over_after_the_lease(store: DeliveryStore) -> None:
    d = _delivery()
    assert isinstance(store.claim(d, T0), Claimed)
    assert not isinstance(store.claim(d, T0 + timedelta(seconds=29)), Claimed)
    assert isinstance(store.claim(d, T0 + timedelta(seconds=31)), Claimed)


def test_concurrent_claims_exactly_one_wins(store: DeliveryStore) -> None:
    d = _delivery()
    results: list[object] = []
    barrier = threading.Barrier(8)

    def race() -> None:
        barrier.wait()
        results.append(store.claim(d, T0))

    threads = [threading.Thread(target=race) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(results) == 8
    assert sum(isinstance(r, Claimed) for r in results) == 1


def test_the_migration_path_creates_the_deliveries_table(tmp_path: Path) -> None:
    assert "flywheel.webhook" in migrations.TABLE_MODULES
    url = f"sqlite:///{tmp_path}/fresh.db"
    assert DELIVERIES_TABLE in migrations.upgrade(url)
    engine = sa.create_engine(url)
    columns = {c["name"] for c in sa.inspect(engine).get_columns(DELIVERIES_TABLE)}
    pk = sa.inspect(engine).get_pk_constraint(DELIVERIES_TABLE)["constrained_columns"]
    engine.dispose()
    assert {"delivery_id", "endpoint", "received_at", "body_sha256", "event_id", "outcome"} <= columns
    assert pk == ["delivery_id"]
