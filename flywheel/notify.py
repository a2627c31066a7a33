"""Alarms reach people: each alarm is POSTed to the outgoing webhooks of `notify.targets`, signed.

Signature: the scheme the inbound receiver verifies (flywheel/hmacsig.py, `v1`): HMAC-SHA256 with the
target's secret over `f"{timestamp}.{delivery_id}.".encode() + body`, sent as
`X-Flywheel-Signature: t=<unix>,v1=<hex>` with `X-Flywheel-Delivery: <uuid>`. The delivery id is signed too,
so a captured request cannot be replayed under a fresh id; it is a function of (alarm, target), the same
on every attempt and every later send of the same alarm, so a receiver deduplicates on it.

Each attempt has a timeout; connection errors, timeouts, 408, 429 and 5xx are retried with exponential
back-off (tenacity), other 4xx are not (the request will not get better). Nothing here raises to the
caller: every delivery, delivered or failed, is a row of `flywheel_notification_deliveries`, and an
alarm already delivered to a target is not sent to it again (a silent loop checked hourly notifies once
per silence, not once per hour).

The `Alarm` itself is defined with the trigger rules (flywheel/triggers.py), which raise most of them.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Literal

import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict

from flywheel.db import project_engine
from flywheel.hmacsig import DELIVERY_HEADER, SIGNATURE_HEADER, signature_header
from flywheel.migrations import METADATA, ensure
from flywheel.settings import NotifyConfig, NotifyTarget
from flywheel.triggers import Alarm

log = logging.getLogger("flywheel.notify")

DELIVERIES_TABLE = "flywheel_notification_deliveries"
NAMESPACE = uuid.UUID("5b0c5f8e-7a52-4d0e-9a0b-3f1e6c2d8a41")  # delivery ids (uuid5)
USER_AGENT = "flywheel-notify/1"
RETRY_STATUS = frozenset({408, 425, 429})  # and every 5xx

def delivery_id(alarm: Alarm, target_url: str) -> str:
    """The id of `alarm`'s delivery to one target: kept across attempts and later sends."""
    return str(uuid.uuid5(NAMESPACE, f"delivery:{alarm.id}:{target_url}"))


def render_body(alarm: Alarm) -> bytes:
    """The JSON body every target receives."""
    return json.dumps({"type": "flywheel.alarm", "alarm": alarm.model_dump(mode="json")},
                      sort_keys=True, separators=(",", ":"), default=str).encode()


def redact(url: str) -> str:
    """A target URL fit for logs and the table: no credentials, no query string (tokens live there)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


# ------------------------------------------------------------------------------------------ sending


class DeliveryResult(BaseModel):
    model_config = ConfigDict(frozen=True)

    alarm_id: str
    target: str  # redacted URL
    delivery_id: str
    outcome: Literal["delivered", "failed", "skipped"]
    attempts: int
    status_code: int | None = None
    error: str | None = None


class _Retryable(Exception):
    def __init__(self, status: int, text: str) -> None:
        self.status = status
        super().__init__(f"HTTP {status}: {text[:200]}")


def _post_with_retries(url: str, body: bytes, secret: str, delivery: str, policy: NotifyConfig,
                       tries: list[int], transport: Any = None) -> int:
    """POST until a non-retryable answer; its status. Raises the last error after `attempts`; each attempt
    is appended to `tries` (so the caller knows how many were made either way)."""
    import httpx
    from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_exponential

    def retryable(exc: BaseException) -> bool:
        return isinstance(exc, _Retryable | httpx.TransportError)

    with httpx.Client(timeout=policy.timeout_s, transport=transport, follow_redirects=False) as client:
        for attempt in Retrying(stop=stop_after_attempt(policy.attempts), reraise=True,
                                retry=retry_if_exception(retryable),
                                wait=wait_exponential(multiplier=policy.backoff_s, max=policy.backoff_max_s)):
            with attempt:
                tries.append(1)
                headers = {  # signed per attempt: the timestamp is the attempt's own
                    "Content-Type": "application/json",
                    "User-Agent": USER_AGENT,
                    DELIVERY_HEADER: delivery,
                    SIGNATURE_HEADER: signature_header([secret], int(time.time()), delivery, body),
                }
                response = client.post(url, content=body, headers=headers)
                if response.status_code in RETRY_STATUS or response.status_code >= 500:
                    raise _Retryable(response.status_code, response.text)
                return response.status_code
    raise AssertionError("unreachable: tenacity re-raises the last error")  # pragma: no cover


def send(alarm: Alarm, target: NotifyTarget, policy: NotifyConfig, environ: Mapping[str, str] | None = None,
         transport: Any = None) -> DeliveryResult:
    """Deliver one alarm to one target. Never raises: the result says what happened."""
    environ = os.environ if environ is None else environ
    shown, delivery = redact(target.url), delivery_id(alarm, target.url)
    result = {"alarm_id": alarm.id, "target": shown, "delivery_id": delivery}
    secret = environ.get(target.secret_env) or ""
    if not secret:
        return DeliveryResult(**result, outcome="failed", attempts=0,
                              error=f"secret variable {target.secret_env} is not set: nothing sent")
    tries: list[int] = []
    try:
        status = _post_with_retries(target.url, render_body(alarm), secret, delivery, policy, tries, transport)
    except _Retryable as exc:
        return DeliveryResult(**result, outcome="failed", attempts=len(tries), status_code=exc.status,
                              error=str(exc))
    except Exception as exc:  # connection refused, timeout, bad URL: recorded, never raised
        return DeliveryResult(**result, outcome="failed", attempts=len(tries),
                              error=f"{type(exc).__name__}: {exc}"[:500])
    attempts = len(tries)
    if 200 <= status < 300:
        return DeliveryResult(**result, outcome="delivered", attempts=attempts, status_code=status)
    return DeliveryResult(**result, outcome="failed", attempts=attempts, status_code=status,
                          error=f"HTTP {status} (not retried)")


# -------------------------------------------------------------------------------------- recording

DELIVERIES = sa.Table(
    DELIVERIES_TABLE,
    METADATA,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("at", sa.DateTime(timezone=False), nullable=False),  # naive UTC wall time of the send
    sa.Column("alarm_id", sa.String(64), nullable=False, index=True),
    sa.Column("kind", sa.String(32), nullable=False),
    sa.Column("model", sa.String(256), nullable=False, index=True),
    sa.Column("summary", sa.Text, nullable=False),
    sa.Column("target", sa.String(2048), nullable=False),  # redacted: no credentials, no query string
    sa.Column("delivery_id", sa.String(64), nullable=False),
    sa.Column("outcome", sa.String(16), nullable=False),  # delivered | failed | skipped
    sa.Column("attempts", sa.Integer, nullable=False),
    sa.Column("status_code", sa.Integer, nullable=True),
    sa.Column("error", sa.Text, nullable=True),
)


class NotificationLog:
    """Every notification delivery in the project database at `url` (the table created where missing)."""

    def __init__(self, url: str) -> None:
        self._engine = project_engine(url, "notification log")
        ensure(self._engine, [DELIVERIES])

    def delivered(self, alarm_id: str, target: str) -> bool:
        q = sa.select(sa.func.count()).select_from(DELIVERIES).where(
            DELIVERIES.c.alarm_id == alarm_id, DELIVERIES.c.target == target, DELIVERIES.c.outcome == "delivered")
        with self._engine.connect() as conn:
            return bool(conn.execute(q).scalar_one())

    def record(self, alarm: Alarm, result: DeliveryResult, at: datetime | None = None) -> None:
        # wall: when the HTTP delivery happened (machinery), not the alarm's time on the project clock
        row = {"at": (at or datetime.now(UTC)).astimezone(UTC).replace(tzinfo=None), "alarm_id": alarm.id,
               "kind": alarm.kind, "model": alarm.model, "summary": alarm.summary, **result.model_dump(
                   include={"target", "delivery_id", "outcome", "attempts", "status_code", "error"})}
        with self._engine.begin() as conn:
            conn.execute(sa.insert(DELIVERIES).values(**row))

    def rows(self, alarm_id: str | None = None) -> list[dict[str, Any]]:
        q = sa.select(DELIVERIES).order_by(DELIVERIES.c.id)
        if alarm_id is not None:
            q = q.where(DELIVERIES.c.alarm_id == alarm_id)
        with self._engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(q)]

    def dispose(self) -> None:
        self._engine.dispose()


def notify(alarm: Alarm, targets: Sequence[NotifyTarget], policy: NotifyConfig, deliveries: NotificationLog | None,
           environ: Mapping[str, str] | None = None, transport: Any = None,
           send_fn: Callable[..., DeliveryResult] = send) -> list[DeliveryResult]:
    """Send `alarm` to every target it has not reached yet, recording each delivery. Never raises."""
    results = []
    for target in targets:
        shown = redact(target.url)
        already = False
        if deliveries is not None:
            try:
                already = deliveries.delivered(alarm.id, shown)
            except Exception as exc:  # the log's database failed: the alarm still goes out, the flow still runs
                log.warning("could not read the deliveries of %s: %s", alarm.id, exc)
        if already:
            result = DeliveryResult(alarm_id=alarm.id, target=shown, delivery_id=delivery_id(alarm, target.url),
                                    outcome="skipped", attempts=0, error="already delivered")
        else:
            result = send_fn(alarm, target, policy, environ, transport)
        if result.outcome == "failed":
            log.warning("alarm %s (%s) not delivered to %s after %d attempt(s): %s", alarm.id, alarm.kind, shown,
                        result.attempts, result.error)
        if deliveries is not None and result.outcome != "skipped":
            try:
                deliveries.record(alarm, result)
            except Exception as exc:
                log.warning("could not record the delivery of %s to %s: %s", alarm.id, shown, exc)
        results.append(result)
    return results
