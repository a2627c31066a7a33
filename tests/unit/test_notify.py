"""Alarms reach people: signed deliveries to a real local receiver (http.server on 127.0.0.1) that verifies
the signature with the inbound scheme; retries, timeouts, refusals and failures are recorded, never raised."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from flywheel.hmacsig import DELIVERY_HEADER, SIGNATURE_HEADER, Secret, SignatureError, verify
from flywheel.notify import NotificationLog, delivery_id, notify, redact
from flywheel.settings import NotifyConfig, NotifyTarget
from flywheel.triggers import Alarm

SECRET = "s3cret-for-tests-0123456789"
ENV = {"ALERTS_SECRET": SECRET}
ALARM = Alarm(id="alarm-1", kind="drift", model="churn", summary="churn: 4 of 10 features drifted",
              occurred=datetime(2026, 3, 1, tzinfo=UTC), evidence={"drifted": ["tenure_months"]},
              report_url="http://127.0.0.1:4200/artifacts/drift-churn")


class Receiver:
    """A tiny webhook receiver: verifies each request like flywheel's inbound one, answers from a script."""

    def __init__(self, answers: list[int] | None = None, delay_s: float = 0.0, secret: str = SECRET) -> None:
        self.answers = list(answers or [])
        self.delay_s = delay_s
        self.requests: list[dict] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                try:
                    verify(self.headers.get(SIGNATURE_HEADER), self.headers.get(DELIVERY_HEADER), body,
                           [Secret("current", secret)], now=time.time(), tolerance_s=300)
                    verified = True
                except SignatureError:
                    verified = False
                receiver.requests.append({"delivery": self.headers.get(DELIVERY_HEADER), "verified": verified,
                                          "body": json.loads(body), "path": self.path})
                time.sleep(receiver.delay_s)
                status = receiver.answers.pop(0) if receiver.answers else 200
                if not verified:
                    status = 401
                try:
                    self.send_response(status)
                    self.end_headers()
                    self.wfile.write(b"{}")
                except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
                    pass

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/alarms?token=abc"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Receiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def cfg(url: str, **kw: object) -> NotifyConfig:
    return NotifyConfig(targets=[NotifyTarget(url=url, secret_env="ALERTS_SECRET")],
                        **{"timeout_s": 2.0, "attempts": 3, "backoff_s": 0.0, **kw})


@pytest.fixture
def log(tmp_path: Path) -> Iterator[NotificationLog]:
    nl = NotificationLog(f"sqlite:///{tmp_path}/flywheel.db")
    yield nl
    nl.dispose()


def test_an_alarm_is_delivered_signed_with_its_report_link_and_recorded(log: NotificationLog) -> None:
    with Receiver() as rx:
        c = cfg(rx.url)
        (result,) = notify(ALARM, c.targets, c, log, ENV)
    assert result.outcome == "delivered" and result.attempts == 1, result
    (req,) = rx.requests
    assert req["verified"], "the receiver verifies the signature with the shared secret"
    assert req["delivery"] == delivery_id(ALARM, rx.url) == result.delivery_id
    assert req["body"]["alarm"]["report_url"] == ALARM.report_url and req["body"]["alarm"]["kind"] == "drift"
    (row,) = log.rows(ALARM.id)
    assert (row["outcome"], row["attempts"], row["status_code"]) == ("delivered", 1, 200)
    assert row["target"] == rx.url.split("?")[0], "the token in the query string is not recorded"


def test_transient_failures_are_retried_with_the_same_delivery_id_each_attempt_signed(log: NotificationLog) -> None:
    with Receiver(answers=[503, 429]) as rx:
        c = cfg(rx.url)
        (result,) = notify(ALARM, c.targets, c, log, ENV)
    assert result.outcome == "delivered" and result.attempts == 3, result
    assert [r["verified"] for r in rx.requests] == [True, True, True]
    assert len({r["delivery"] for r in rx.requests}) == 1, "retries keep the delivery id: the receiver dedupes"


def test_a_target_that_keeps_failing_is_recorded_and_nothing_raises(log: NotificationLog) -> None:
    with Receiver(answers=[500, 500, 500]) as rx:
        c = cfg(rx.url)
        (result,) = notify(ALARM, c.targets, c, log, ENV)
    assert (result.outcome, result.attempts, result.status_code) == ("failed", 3, 500), result
    assert len(rx.requests) == 3
    (row,) = log.rows(ALARM.id)
    assert row["outcome"] == "failed" and "HTTP 500" in row["error"]


def test_a_refusal_is_not_retried(log: NotificationLog) -> None:
    with Receiver(secret="another-secret-entirely-123") as rx:  # the receiver expects another secret: 401
        c = cfg(rx.url)
        (result,) = notify(ALARM, c.targets, c, log, ENV)
    assert (result.outcome, result.attempts, result.status_code) == ("failed", 1, 401), result
    assert [r["verified"] for r in rx.requests] == [False]


def test_a_slow_target_times_out_per_attempt(log: NotificationLog) -> None:
    with Receiver(delay_s=1.0) as rx:
        c = cfg(rx.url, timeout_s=0.2, attempts=2)
        started = time.monotonic()
        (result,) = notify(ALARM, c.targets, c, log, ENV)
        took = time.monotonic() - started
    assert result.outcome == "failed" and "Timeout" in (result.error or ""), result
    assert took < 1.5, f"two attempts of 0.2 s should not take {took:.1f} s"


def test_an_unreachable_target_is_recorded(log: NotificationLog) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    c = cfg(f"http://127.0.0.1:{port}/hook", attempts=2)
    (result,) = notify(ALARM, c.targets, c, log, ENV)
    assert result.outcome == "failed" and "ConnectError" in (result.error or ""), result
    assert log.rows(ALARM.id)[0]["outcome"] == "failed"


def test_a_missing_secret_sends_nothing_and_says_which_variable(log: NotificationLog) -> None:
    with Receiver() as rx:
        c = cfg(rx.url)
        (result,) = notify(ALARM, c.targets, c, log, environ={})
    assert rx.requests == [] and result.outcome == "failed" and result.attempts == 0
    assert "ALERTS_SECRET is not set" in (result.error or "")


def test_an_alarm_delivered_once_is_not_sent_again_but_a_failed_one_is(log: NotificationLog) -> None:
    with Receiver(answers=[500, 500, 500]) as rx:
        c = cfg(rx.url)
        assert notify(ALARM, c.targets, c, log, ENV)[0].outcome == "failed"
        assert notify(ALARM, c.targets, c, log, ENV)[0].outcome == "delivered", "a failed alarm is sent again"
        assert notify(ALARM, c.targets, c, log, ENV)[0].outcome == "skipped", "a delivered alarm is not"
    assert len(rx.requests) == 4


def test_every_target_is_tried_even_when_one_fails(log: NotificationLog) -> None:
    with Receiver(answers=[404]) as bad, Receiver() as good:
        c = NotifyConfig(targets=[NotifyTarget(url=bad.url, secret_env="ALERTS_SECRET"),
                                  NotifyTarget(url=good.url, secret_env="ALERTS_SECRET")], backoff_s=0)
        results = notify(ALARM, c.targets, c, log, ENV)
    assert [r.outcome for r in results] == ["failed", "delivered"]


def test_notify_alarm_task_sends_and_records(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tasks.triggers import notify_alarm

    monkeypatch.setenv("ALERTS_SECRET", SECRET)
    url = f"sqlite:///{tmp_path}/flywheel.db"
    with Receiver() as rx:
        results = notify_alarm.fn(ALARM, cfg(rx.url), url)
    assert [r.outcome for r in results] == ["delivered"] and rx.requests[0]["verified"]
    assert notify_alarm.fn(ALARM, NotifyConfig(), url) == [], "no targets: logged, sent nowhere"


def test_redact_drops_credentials_and_query() -> None:
    assert redact("https://user:pw@alerts.example.com:8443/h/x?token=1#f") == "https://alerts.example.com:8443/h/x"
