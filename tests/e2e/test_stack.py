"""`flywheel up` / `status` / `down` for real, on free ports in a temp project home.

The event triggers are tested against the real server with the deployments served: a signed
`POST /hooks/retrain` to the stack's webhook receiver must create exactly one run of the training
deployment (a signed repeat none); and the event that training emits for a passing challenger
(`flywheel.model.challenger-registered`, emitted by the same function tasks/register.py uses) must
create a run of the rollout deployment, with the model name and version of the event as parameters,
and the serve process must pick it up. The test asserts creation, parameters and pickup only.

The stack is the session's (tests/e2e/conftest.py), shared with the browser test: after that module it holds
champion v1 and a rejected v2; run alone, no model. Runs that existed before a test are not counted as its own.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import httpx
import pytest

from tests.conftest import PROJECT
from tests.e2e.stackproc import WEBHOOK_SECRET, Stack, read_records
from tests.e2e.stackproc import ours as _ours

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

PICKED_UP = {"PENDING", "RUNNING", "COMPLETED", "FAILED", "CRASHED", "CANCELLING", "CANCELLED"}


@pytest.fixture(scope="module")
def stack(local_stack: Stack) -> Stack:
    """The session's stack (tests/e2e/conftest.py); this module's last test stops it."""
    return local_stack


def test_up_starts_every_process_and_says_where(stack: Stack) -> None:
    names = {r["name"] for r in stack.records}
    assert names == {"prefect", "deployments", "service", "webhook", "mlflow-ui"}
    assert all(_ours(r) is not None for r in stack.records)
    out = stack.up_output
    hook = next(r for r in stack.records if r["name"] == "webhook")
    assert hook["url"] in out and "flywheel webhook sign" in out
    health = httpx.get(f"{hook['url']}/health", timeout=5).json()
    assert {k: health[k] for k in ("ok", "deliveries_db", "prefect_api")} == {
        "ok": True, "deliveries_db": "ok", "prefect_api": "ok"}, health
    assert health["outbox"]["pending"] == 0 and health["loop"]["model"] == "churn", health
    assert stack.api.removesuffix("/api") in out, out  # the UI URL
    assert f"export PREFECT_API_URL={stack.api}" in out
    assert "flywheel down" in out and "mlflow" in out.lower()
    assert httpx.get(f"{stack.api}/health", timeout=5).json() is True
    assert (stack.home / "data" / "run" / "prefect.url").read_text().strip() == stack.api
    assert (stack.home / "data" / "prefect" / "prefect.db").is_file()  # the stack's own SQLite database
    for rec in stack.records:
        assert (stack.home / "data" / "run" / f"{rec['name']}.log").is_file()


def test_up_again_is_idempotent_and_status_reports_health(stack: Stack) -> None:
    again = stack.cli("up", timeout=120)
    text = again.stdout + again.stderr
    assert again.returncode == 0, text
    for name in ("prefect", "deployments", "service", "webhook", "mlflow-ui"):
        assert f"{name}: already running" in text
    assert read_records(stack.run_dir) == stack.records  # nothing restarted

    status = stack.cli("status", timeout=60)
    text = status.stdout + status.stderr
    assert status.returncode == 0, text
    lines = {line.split()[0]: line for line in text.splitlines() if line.strip()}
    assert "healthy" in lines["prefect"]
    assert "healthy" in lines["deployments"] and "batch-scoring" in lines["deployments"]
    # the service's line says what the service answers: 200 with a champion (the browser module trains one), else
    # 503 "no model loaded yet"
    served = httpx.get(next(r["health_url"] for r in stack.records if r["name"] == "service"), timeout=10)
    assert f"HTTP {served.status_code}" in lines["service"], (served.status_code, lines["service"])
    assert ("healthy" if served.status_code == 200 else "no model loaded yet") in lines["service"]
    assert "healthy" in lines["webhook"]


def test_batch_scoring_is_served_with_the_settings_cron(stack: Stack) -> None:
    from flywheel.settings import load_settings

    cron = load_settings("ci", stack.home / "configs", environ={}).batch.cron
    deps = httpx.post(f"{stack.api}/deployments/filter", json={}, timeout=10).json()
    by_name = {d["name"]: d for d in deps}
    assert {"training", "batch-scoring"} <= set(by_name)
    batch = by_name["batch-scoring"]
    assert not batch["paused"]
    assert [s["schedule"]["cron"] for s in batch["schedules"]] == [cron]
    assert batch["parameters"]["params"]["profile"] == "ci"
    assert batch["parameters"]["params"]["config_dir"] == str(stack.home / "configs")


def test_challenger_event_starts_a_rollout_run_picked_up_by_serve(stack: Stack) -> None:
    deps = httpx.post(f"{stack.api}/deployments/filter", json={"deployments": {"name": {"any_": ["rollout"]}}},
                      timeout=10).json()
    if not (PROJECT / "flows" / "rollout.py").is_file():
        pytest.skip("flows/rollout.py does not exist yet: the rollout deployment is not served")
    assert len(deps) == 1, deps
    rollout_id = deps[0]["id"]

    def rollout_runs() -> list[dict]:
        return httpx.post(f"{stack.api}/flow_runs/filter",
                          json={"flow_runs": {"deployment_id": {"any_": [rollout_id]}}}, timeout=10).json()

    before = {r["id"] for r in rollout_runs()}
    emit = ("from tasks.register import emit_model_event\n"
            "assert emit_model_event('flywheel.model.challenger-registered', 'churn', '2', "
            "{'version': '2', 'outcome': 'challenger'}) is not None\n")
    env = {**stack.env, "PREFECT_API_URL": stack.api, "PYTHONPATH": str(PROJECT)}
    sent = subprocess.run([sys.executable, "-c", emit], env=env, cwd=PROJECT, capture_output=True, text=True,
                          timeout=120)
    assert sent.returncode == 0, sent.stderr

    # the automation creates a Scheduled run within seconds; the serve process polls every 10 s
    sent_at = time.monotonic()
    deadline = sent_at + 90
    run, created = None, None
    while time.monotonic() < deadline:
        runs = [r for r in rollout_runs() if r["id"] not in before]
        if runs:
            run = runs[0]
            created = created or time.monotonic() - sent_at
            if run["state"] and run["state"]["type"] in PICKED_UP:
                break
        time.sleep(0.5)
    # measurements for the record (`pytest -s`), not assertions
    print(f"\nevent -> run created {created:.1f} s, -> picked up {time.monotonic() - sent_at:.1f} s" if created else "")
    assert run is not None, "the event created no run of the rollout deployment"
    assert run["state"]["type"] in PICKED_UP, f"run {run['id']} was not picked up: {run['state']['type']}"
    assert run["parameters"]["params"] == {
        "model_name": "churn", "challenger_version": "2", "profile": "ci", "config_dir": str(stack.home / "configs"),
    }
    # picked up by OUR serve process: its log names the run it submitted
    deadline = time.monotonic() + 30
    log = stack.home / "data" / "run" / "deployments.log"
    while run["id"] not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert run["id"] in log.read_text()


def test_a_signed_retrain_webhook_starts_exactly_one_training_run(stack: Stack) -> None:
    from flywheel.hmacsig import signature_header

    deps = httpx.post(f"{stack.api}/deployments/filter", json={"deployments": {"name": {"any_": ["training"]}}},
                      timeout=10).json()
    assert len(deps) == 1, deps
    training = deps[0]
    assert training["global_concurrency_limit"]["limit"] == 1  # (`concurrency_limit` itself is deprecated: None)
    assert training["concurrency_options"]["collision_strategy"] == "ENQUEUE"
    hook = next(r for r in stack.records if r["name"] == "webhook")["url"]
    raw = json.dumps({"reason": "e2e: labels reviewed"}).encode()

    def deliver() -> httpx.Response:  # each attempt signed afresh, as a sender's retry would be
        sig = signature_header([WEBHOOK_SECRET], int(time.time()), "e2e-retrain-1", raw)
        return httpx.post(f"{hook}/hooks/retrain", content=raw, timeout=30, headers={
            "Content-Type": "application/json", "X-Flywheel-Delivery": "e2e-retrain-1", "X-Flywheel-Signature": sig})

    def all_runs() -> list[dict]:
        return httpx.post(f"{stack.api}/flow_runs/filter", timeout=10,
                          json={"flow_runs": {"deployment_id": {"any_": [training["id"]]}}}).json()

    before = {r["id"] for r in all_runs()}  # the shared stack's browser module ran one from the form

    def runs() -> list[dict]:  # those this test started
        return [r for r in all_runs() if r["id"] not in before]

    sent_at = time.monotonic()
    first = deliver()
    assert first.status_code == 202, first.text
    again = deliver().json()
    assert again.pop("status") in ("pending", "emitted")  # its event queued in the outbox, or already out
    assert again == {"duplicate": True, "of": first.json()["event_id"], "delivery": "e2e-retrain-1",
                     "event": "flywheel.retrain.requested"}

    deadline = time.monotonic() + 60
    while not runs() and time.monotonic() < deadline:
        time.sleep(0.5)
    created = time.monotonic() - sent_at
    time.sleep(8)  # a second run, had the repeat started one, would exist by now (the first took `created`)
    found = runs()
    print(f"\nwebhook -> training run created {created:.1f} s")
    assert len(found) == 1, [r["id"] for r in found]
    params = dict(found[0]["parameters"]["params"])
    # the webhook's event names no training_source: the template renders null and the dataset's own applies
    assert params.pop("training_source") is None, params
    assert params == {"reason": "e2e: labels reviewed", "profile": "ci",
                                                "config_dir": str(stack.home / "configs"),
                                                # the run records itself on the webhook's trigger decision
                                                "decision_id": first.json()["decision"],
                                                "trigger": "retrain_requested"}


def test_active_api_url_finds_the_running_stack(stack: Stack) -> None:
    from flywheel.settings import load_settings
    from flywheel.stack import active_api_url

    settings = load_settings("ci", stack.home / "configs", environ={})
    assert active_api_url(settings, environ={}) == stack.api
    assert active_api_url(settings, environ={"PREFECT_API_URL": "http://elsewhere/api"}) is None


def test_down_stops_every_process_it_started(stack: Stack) -> None:
    assert stack.records
    result = stack.cli("down", timeout=120)
    text = result.stdout + result.stderr
    assert result.returncode == 0, text
    for rec in stack.records:
        assert f"{rec['name']}: stopped (pid {rec['pid']})" in text
        assert _ours(rec) is None, f"{rec['name']} (pid {rec['pid']}) still running"
    run_dir = stack.home / "data" / "run"
    assert not list(run_dir.glob("*.pid"))
    assert not (run_dir / "prefect.url").exists()
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{stack.api}/health", timeout=2)
    status = stack.cli("status", timeout=60)
    assert status.returncode == 1 and "not running" in status.stdout + status.stderr
