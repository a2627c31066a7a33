"""Fuzzed input: the online service's and the webhook receiver's own OpenAPI schemas drive schemathesis
(valid and invalid requests, a bounded number per endpoint) against the real apps served by uvicorn on a free
127.0.0.1 port, with real stores behind them (a model trained and registered in MLflow, the Feast online
store, the prediction log; the deliveries table and the session's Prefect server). No answer may be a 5xx,
every 4xx must say what is wrong, and the apps must still be healthy at the end.

Cases are generated with each operation's hypothesis strategy (`schemathesis.pytest.from_fixture` crashes
under the locked pytest, and a module-level `from_asgi` schema would build the apps at import time).
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import make_home

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.usefixtures("prefect_harness")]

MAX_EXAMPLES = int(os.environ.get("FLYWHEEL_FUZZ_EXAMPLES", "30"))  # per endpoint, valid and invalid mixed
TOKEN = "fuzz-admin-token-0123456789"
SECRET = "fuzz-webhook-secret-0123456789"


@dataclass
class Served:
    """An ASGI app served by uvicorn in a thread of this process."""

    app: Any
    server: Any
    thread: threading.Thread
    url: str

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        assert not self.thread.is_alive(), "uvicorn did not stop"


def serve_app(app: Any) -> Served:
    import socket

    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    return Served(app, server, thread, f"http://127.0.0.1:{port}")


@pytest.fixture(scope="module")
def trained_home(tmp_path_factory: pytest.TempPathFactory, prefect_harness: None) -> Path:
    """A home whose registry holds a champion (one trial per family, 6,300 rows), the online store materialized."""
    from flows.training import TrainingParams, training_pipeline
    from flywheel.datagen import GeneratorSpec, write_batches

    home = make_home(tmp_path_factory.mktemp("fuzz-home"))
    (home / "configs" / "ci.yaml").write_text(
        "train:\n  search: {trials: 1}\n"
        "rollout: {approval_required: false, max_p99_latency_ms: 200}\n")
    write_batches(GeneratorSpec(seed=3, days=21, rows_per_day=300, customers=3000), home / "data/incoming/churn")
    result = training_pipeline(TrainingParams(profile="ci", config_dir=str(home / "configs")))
    assert result.alias == "champion", result
    return home


@pytest.fixture(scope="module")
def service(trained_home: Path) -> Iterator[Served]:
    from flywheel.service import create_app
    from flywheel.settings import load_settings

    settings = load_settings("ci", trained_home / "configs", environ={})
    served = serve_app(create_app(settings, admin_token=TOKEN, poll=False))
    ready = httpx.get(f"{served.url}/health", timeout=30)
    assert ready.status_code == 200, ready.text
    yield served
    served.stop()


@pytest.fixture(scope="module")
def receiver(tmp_path_factory: pytest.TempPathFactory, prefect_harness: None) -> Iterator[Served]:
    from prefect.settings import PREFECT_API_URL

    from flywheel.hmacsig import Secret
    from flywheel.settings import load_settings
    from flywheel.webhook import create_app

    settings = load_settings("ci", make_home(tmp_path_factory.mktemp("fuzz-hooks")) / "configs", environ={})
    app = create_app(settings, [Secret("current", SECRET)], str(PREFECT_API_URL.value()),
                     model_name=f"fuzz{uuid.uuid4().hex[:8]}")
    served = serve_app(app)
    yield served
    served.stop()


def names_the_problem(response: httpx.Response) -> str | None:
    """Why a 4xx answer does not say what is wrong; None when it does (a non-empty JSON `detail`)."""
    try:
        body = response.json()
    except ValueError:
        return f"{response.status_code} without a JSON body: {response.text[:200]!r}"
    detail = body.get("detail") if isinstance(body, dict) else None
    if isinstance(detail, list):  # FastAPI's own validation list: each entry has a location and a message
        ok = detail and all(isinstance(d, dict) and d.get("msg") and d.get("loc") for d in detail)
        return None if ok else f"{response.status_code} with an empty problem list: {body}"
    if not isinstance(detail, str) or len(detail.strip()) < 8:
        return f"{response.status_code} without a detail naming the problem: {body}"
    return None


def fuzz(base_url: str, prepare: Callable[[Any], httpx.Request] | None = None, seen: dict | None = None) -> None:
    """Every operation of the app's OpenAPI schema, valid and invalid cases: no 5xx, every 4xx explained."""
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st
    from schemathesis import GenerationMode

    spec = httpx.get(f"{base_url}/openapi.json", timeout=30).json()
    schema = schemathesis.openapi.from_dict(spec)
    failures: list[str] = []
    seen = {} if seen is None else seen
    with httpx.Client(base_url=base_url, timeout=60) as http:

        def send(case: Any) -> None:
            if prepare is not None:
                request = prepare(case)
            else:
                kw = case.as_transport_kwargs(base_url=base_url)
                request = http.build_request(kw["method"], kw["url"], headers=kw.get("headers"),
                                             params=kw.get("params"), cookies=kw.get("cookies"),
                                             json=kw.get("json"), content=kw.get("data"))
            response = http.send(request)
            label = case.operation.label
            seen.setdefault(label, {}).setdefault(response.status_code, 0)
            seen[label][response.status_code] += 1
            where = f"{label} {request.content[:300]!r}"
            if response.status_code >= 500:
                failures.append(f"{where} -> {response.status_code} {response.text[:300]}")
            elif response.status_code >= 400 and (why := names_the_problem(response)):
                failures.append(f"{where} -> {why}")

        for result in schema.get_all_operations():
            operation = result.ok()
            strategy = st.one_of(operation.as_strategy(GenerationMode.POSITIVE),
                                 operation.as_strategy(GenerationMode.NEGATIVE))
            bounded = settings(max_examples=MAX_EXAMPLES, deadline=None, database=None, derandomize=True,
                               phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
            given(case=strategy)(bounded(lambda case: send(case)))()  # a fresh function per operation
    assert not failures, f"{len(failures)} bad answers, e.g.:\n" + "\n".join(failures[:10])


def test_service_survives_fuzzed_requests(service: Served) -> None:
    seen: dict = {}
    fuzz(service.url, seen=seen)
    assert {"POST /predict", "GET /health", "POST /admin/routing"} <= set(seen), seen
    assert any(code == 422 for code in seen["POST /predict"]), f"invalid bodies were refused as such: {seen}"
    assert httpx.get(f"{service.url}/health", timeout=30).status_code == 200, "still healthy after the fuzzing"
    print("service status codes per endpoint:", json.dumps(seen))


def test_service_admin_endpoints_with_the_token(service: Served) -> None:
    """The admin bodies themselves, past the bearer check."""
    seen: dict = {}

    def with_token(case: Any) -> httpx.Request:
        kw = case.as_transport_kwargs(base_url=service.url)
        headers = {**(kw.get("headers") or {}), "Authorization": f"Bearer {TOKEN}"}
        return httpx.Request(kw["method"], kw["url"], headers=headers, params=kw.get("params"),
                             json=kw.get("json"), content=kw.get("data"))

    fuzz(service.url, with_token, seen)
    assert any(code == 200 for code in seen["POST /admin/routing"]), seen
    httpx.post(f"{service.url}/admin/routing", json={"mode": "single"},
               headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
    assert httpx.get(f"{service.url}/health", timeout=30).status_code == 200


def test_huge_json_integer_is_a_422_naming_the_field(service: Served) -> None:
    """Regression: a numeric feature of a few hundred digits made math.isfinite raise OverflowError (a 500)."""
    row = {"tenure_months": 12, "monthly_charges": 50.0, "support_tickets_30d": 1, "avg_session_minutes": 30.0,
           "payment_delay_days": 0, "num_products": 2, "contract_type": "monthly", "payment_method": "card",
           "region": "north", "segment": "consumer"}
    body = json.dumps({"rows": [row]}).replace('"monthly_charges": 50.0', '"monthly_charges": ' + "9" * 400)
    answer = httpx.post(f"{service.url}/predict", content=body, headers={"Content-Type": "application/json"},
                        timeout=30)
    assert answer.status_code == 422, answer.text
    assert "monthly_charges" in answer.json()["detail"] and "too large" in answer.json()["detail"], answer.text
    assert httpx.post(f"{service.url}/predict", json={"rows": [row]}, timeout=30).status_code == 200


def test_webhook_receiver_survives_fuzzed_requests(receiver: Served) -> None:
    """As generated: the signature and delivery headers are random, so mostly 401 and 400."""
    seen: dict = {}
    fuzz(receiver.url, seen=seen)
    assert any(code == 401 for codes in seen.values() for code in codes), seen
    assert httpx.get(f"{receiver.url}/health", timeout=30).status_code == 200


def test_webhook_receiver_survives_fuzzed_signed_bodies(receiver: Served) -> None:
    """Each generated body signed with the right secret and a fresh delivery id: the body checks themselves."""
    from flywheel.hmacsig import signature_header

    seen: dict = {}

    def signed(case: Any) -> httpx.Request:
        kw = case.as_transport_kwargs(base_url=receiver.url)
        raw = json.dumps(kw["json"]).encode() if "json" in kw else (kw.get("data") or b"")
        raw = raw.encode() if isinstance(raw, str) else raw
        delivery = f"fuzz-{uuid.uuid4().hex}"
        headers = {"Content-Type": "application/json", "X-Flywheel-Delivery": delivery,
                   "X-Flywheel-Signature": signature_header([SECRET], int(time.time()), delivery, raw)}
        return httpx.Request(kw["method"], kw["url"], headers=headers, content=raw)

    fuzz(receiver.url, signed, seen)
    hooks = {label: codes for label, codes in seen.items() if label.startswith("POST /hooks/")}
    assert any(code == 422 for codes in hooks.values() for code in codes), f"bad bodies reached the checks: {seen}"
    assert any(code in (200, 202) for codes in hooks.values() for code in codes), f"good bodies accepted: {seen}"
    assert httpx.get(f"{receiver.url}/health", timeout=30).status_code == 200
