"""The webhook receiver (`flywheel webhook`): verify a signed delivery, record it, emit one Prefect event.

The open-source Prefect server has no inbound webhooks (a Prefect Cloud feature) and its events endpoint
has no auth beyond basic auth, so outside systems call this receiver instead:

- POST /hooks/retrain        {"reason": "...", "model": "churn"?}    -> event flywheel.retrain.requested
- POST /hooks/data-landed    {"dataset": "churn", "uri": "...", "rows": 1000?} -> flywheel.data.landed
- POST /hooks/labels-landed  {"dataset": "churn", "uri": "...", "rows": 1000?} -> flywheel.labels.landed
  (`uri`: a batch file under the dataset's incoming folder, `source` / `outcomes.source`, which must exist:
  else 422; the event's payload adds its absolute `path`, which the `ingest` / `outcomes` deployments
  validate and ingest)
- GET  /health               200 when the deliveries table and the Prefect API answer, else 503; both with the
                             outbox backlog (deliveries accepted, event not yet emitted) and its oldest age
- GET  /metrics              Prometheus text: requests by endpoint and status, events emitted, latency, outbox

A request is checked in this order, and stops at the first failure with nothing recorded or emitted:
1. size (413): Content-Length over `webhook.max_body_bytes`, or more bytes than that arrive; the body is
   never read past the limit. It comes first because the signature covers the body.
2. signature (401): the delivery id header, the signature header, its timestamp within
   `webhook.tolerance_s` (past or future), then the HMAC (flywheel/hmacsig.py) against the current or
   the previous secret.
3. body (422, naming the field): JSON of the endpoint's model. It comes AFTER the signature on purpose:
   a caller without the secret gets the same 401 whatever it sends, so the receiver is no oracle for
   probing which fields, models or datasets exist, and it never parses a stranger's JSON.
4. the delivery record (`flywheel_webhook_deliveries`, primary key = delivery id), inserted `claimed`: a
   delivery already accepted (`pending` or `emitted`) answers 200 {"duplicate": true, "of": <event id>} and
   starts nothing; the same delivery id with another body or endpoint is a 409; concurrent copies race on the
   primary-key insert and exactly one is recorded (the others wait for it and answer duplicate).
5. for /hooks/retrain, the trigger decision (`flywheel_trigger_decisions`, beside the automatic ones): an explicit
   request, held by neither the cooldown nor a pause, only by dedupe on the delivery id (its signal's event id
   is `webhook:<delivery id>`); its evidence names the delivery and the reason. The event carries the
   decision's id (as every fired decision's event does) and `decision_id` in its payload, which the training
   run records on the decision when it starts. A retry of a delivery refused here (403 for a disabled
   `retrain_requested` rule, recorded as suppressed; 503 for a decisions database that failed) re-decides,
   and a duplicate decision re-uses the first fired one's event.
6. the outbox (202): the event (its id derived from the delivery id: uuid5; for /hooks/retrain the
   decision's id, itself derived from it) is written into the delivery's row, now `pending`, and the request
   is answered with the event id. Prefect is not called on the request's path: a sender thread
   (flywheel/outbox.py, started in the app's lifespan) posts pending events to POST {PREFECT_API_URL}/events
   in batches, retrying transient failures (tenacity) and then backing off per row, and marks them
   `emitted` (and a retrain's decision `emitted_at`). An unreachable Prefect loses nothing: deliveries are
   still accepted and wait, pending, until it answers. On start the sender resends whatever is pending
   (a crash between the send and the mark re-sends an event id, which Prefect de-duplicates). A row left
   `claimed` by a crashed request is taken over by a retry after a lease.

Hot path: this module imports only the core (settings, db, migrations, errors, hmacsig, the outbox, the loop's
liveness check, the trigger decisions store and its pure rules, the clock; the dataset definition for the
default model name),
never tasks, flows, Prefect, MLflow, Feast or scikit-learn (`tests/unit/test_webhook.py` checks it in a fresh
interpreter).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import httpx
import sqlalchemy as sa
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from flywheel import migrations
from flywheel.apidocs import offline_docs_app
from flywheel.clock import Clock, WallClock, build_clock
from flywheel.db import project_engine
from flywheel.errors import FlywheelError
from flywheel.hmacsig import DELIVERY_HEADER, SIGNATURE_HEADER, Secret, SignatureError, Verified, verify
from flywheel.landing import NotALandedBatch, incoming_folder, resolve_landed
from flywheel.liveness import read as read_liveness
from flywheel.outbox import OutboxSender, Pending, Refusal, Unreachable, event_json
from flywheel.trigger_decisions import TriggerDecisions
from flywheel.trigger_policy import TriggerPolicy, load_policy
from flywheel.triggers import Decision, request_signal

if TYPE_CHECKING:
    from flywheel.settings import Settings

log = logging.getLogger("flywheel.webhook")
DELIVERIES_TABLE = "flywheel_webhook_deliveries"
# event ids are uuid5(EVENT_NAMESPACE, delivery id): the same delivery always names the same event
EVENT_NAMESPACE = uuid.UUID("6b1f6f0e-3c52-5d0a-9a57-0f1e7c0d2a41")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

# ------------------------------------------------------------------------------------------ bodies


def _name(value: str) -> str:
    if not _NAME.fullmatch(value):
        raise ValueError("must be 1-64 characters of A-Z a-z 0-9 _ . - starting with a letter or digit")
    return value


def _no_control_chars(value: str) -> str:
    if _CONTROL.search(value):
        raise ValueError("must not contain control characters")
    return value


def _uri(value: str) -> str:
    if not value.strip() or any(c.isspace() for c in value) or _CONTROL.search(value):
        raise ValueError("must be a path or URI without whitespace or control characters")
    return value


Name = Annotated[StrictStr, AfterValidator(_name)]
Text = Annotated[StrictStr, Field(min_length=1, max_length=500), AfterValidator(_no_control_chars)]
Uri = Annotated[StrictStr, Field(min_length=1, max_length=2048), AfterValidator(_uri)]


class HookBody(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RetrainBody(HookBody):
    """Ask for a retrain of a model (default: the model this stack trains)."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"reason": "new labels reviewed", "model": "churn"}]})
    reason: Text = Field(description="why; becomes the training run's `reason` parameter")
    model: Name | None = Field(None, description="registered model name (default: the one this stack trains)")


class BatchLandedBody(HookBody):
    """A batch is ready where `uri` says (the receiver checks it is a file under the incoming folder and
    announces it; it never reads it)."""

    model_config = ConfigDict(json_schema_extra={"examples": [
        {"dataset": "churn", "uri": "batch_2026-03-01.parquet", "rows": 1000}]})
    dataset: Name = Field(description="dataset name (its definition's `name`)")
    uri: Uri = Field(description="the batch file: relative to the dataset's incoming folder (`source` for data, "
                                 "`outcomes.source` for labels), or an absolute path / file:// URI under it")
    rows: StrictInt | None = Field(None, ge=0, description="row count, if the sender knows it")


class Accepted(BaseModel):
    accepted: Literal[True] = True
    delivery: str
    event: str = Field(description="the Prefect event this delivery emits")
    event_id: str = Field(description="its id (uuid5 of the delivery id): find it in the Prefect UI's event feed")
    resource: str = Field(description="the event's prefect.resource.id, what triggers match on")
    decision: str | None = Field(None, description="retrain: the trigger decision recorded (`flywheel triggers list`)")
    status: Literal["pending"] = Field("pending", description="recorded with its event, which the receiver's "
                                       "outbox emits in the background (at once while Prefect answers)")


class Duplicate(BaseModel):
    duplicate: Literal[True] = True
    of: str = Field(description="the event id the first copy of this delivery emits")
    delivery: str
    event: str
    status: Literal["pending", "emitted"] = Field(description="the first copy's event: still queued, or emitted")


class Problem(BaseModel):
    detail: str
    problems: list[str] = []


@dataclass(frozen=True)
class Hook:
    """One endpoint: its path, body model and the event it emits."""

    name: str  # the path segment and the `endpoint` column
    event: str
    body: type[HookBody]
    summary: str


HOOKS: dict[str, Hook] = {h.name: h for h in (
    Hook("retrain", "flywheel.retrain.requested", RetrainBody,
         "Request a retrain: the training deployment's trigger runs on this event"),
    Hook("data-landed", "flywheel.data.landed", BatchLandedBody, "A data batch is ready"),
    Hook("labels-landed", "flywheel.labels.landed", BatchLandedBody, "A batch of labels is ready"),
)}


def event_id_for(delivery_id: str) -> uuid.UUID:
    return uuid.uuid5(EVENT_NAMESPACE, delivery_id)


def retrain_signal_id(delivery_id: str) -> str:
    """The event id of the trigger signal a retrain delivery becomes: dedupe keys on it."""
    return f"webhook:{delivery_id}"


def retrain_event_id(delivery_id: str) -> str:
    """The id of the event (and of the trigger decision) an accepted retrain delivery emits: its signal's first
    decision (flywheel/triggers.py `decision_id`)."""
    from flywheel.triggers import decision_id

    return decision_id(retrain_signal_id(delivery_id), 0)


def build_event(hook: Hook, body: HookBody, delivery_id: str, occurred: datetime, model: str,
                decision: Decision | None = None, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The Prefect event (REST shape of prefect.server.events.schemas.events.Event) for one delivery; a retrain's
    carries the id of its trigger decision (as the event's id and in its payload, with the signal's kind)."""
    payload = {**body.model_dump(mode="json"), **(extra or {}), "delivery": delivery_id}
    if decision is not None:
        payload.update(decision_id=decision.id, kind=decision.kind)
    if isinstance(body, RetrainBody):
        payload["model"] = model  # resolved default, so the event says which model it is about
        resource = {"prefect.resource.id": f"flywheel.model.{model}", "prefect.resource.name": model,
                    "flywheel.model": model}
    else:
        dataset = payload["dataset"]
        resource = {"prefect.resource.id": f"flywheel.dataset.{dataset}", "prefect.resource.name": dataset,
                    "flywheel.dataset": dataset}
    event_id = decision.id if decision is not None else str(event_id_for(delivery_id))
    return {"id": event_id, "occurred": occurred.isoformat(), "event": hook.event,
            "resource": resource, "payload": payload}


# -------------------------------------------------------------------------------------- deliveries

DELIVERIES = sa.Table(
    DELIVERIES_TABLE, migrations.METADATA,
    sa.Column("delivery_id", sa.String(128), primary_key=True),  # the arbiter of duplicates and races
    sa.Column("endpoint", sa.String(32), nullable=False),
    sa.Column("received_at", sa.DateTime, nullable=False),  # naive UTC (as flywheel/locks.py)
    sa.Column("body_sha256", sa.String(64), nullable=False),
    sa.Column("event", sa.String(64), nullable=False),
    sa.Column("event_id", sa.String(36), nullable=False),
    # claimed (a request is recording it) | pending (queued: the outbox sender will emit it) | emitted | failed
    sa.Column("outcome", sa.String(16), nullable=False),
    sa.Column("signed_with", sa.String(16), nullable=False),  # current | previous: a rotation's progress
    sa.Column("attempts", sa.Integer, nullable=False),
    sa.Column("claim", sa.String(32), nullable=False),  # token of the request emitting it now
    sa.Column("claimed_at", sa.DateTime, nullable=False),
    sa.Column("finished_at", sa.DateTime, nullable=True),
    sa.Column("detail", sa.String(500), nullable=True),  # why the last attempt failed
    sa.Column("event_body", sa.Text, nullable=True),  # the event to send (JSON), once the delivery is queued
    sa.Column("next_attempt_at", sa.DateTime, nullable=True),  # the outbox sends a pending row from then on
    sa.Column("send_attempts", sa.Integer, nullable=True),  # failed sends so far (back-off grows with them)
    sa.Index("ix_flywheel_webhook_deliveries_outbox", "outcome", "next_attempt_at"),
)


# the two statements of every delivery's path, built once: parameters per call, not a new statement each time
# (building `.values(...)` per request cost about as much CPU as the commit itself)
_INSERT_CLAIM = DELIVERIES.insert()
_QUEUE = DELIVERIES.update().where(
    DELIVERIES.c.delivery_id == sa.bindparam("did"), DELIVERIES.c.claim == sa.bindparam("token"),
).values(outcome="pending", event_id=sa.bindparam("event_id"), event_body=sa.bindparam("event_body"),
         next_attempt_at=sa.bindparam("at"), send_attempts=0, detail=None)


class StoreUnavailable(FlywheelError):
    """The deliveries database could not be read or written."""


@dataclass(frozen=True)
class Delivery:
    delivery_id: str
    endpoint: str
    body_sha256: str
    event: str
    event_id: str
    signed_with: str


@dataclass(frozen=True)
class Claimed:
    """This request owns the delivery now: it records the decision (retrain), then `queue`s or `fail`s it."""

    token: str
    received_at: datetime


def _sqlite_write_ahead_log(dbapi_conn: Any, _record: Any) -> None:
    """Two commits per delivery sit on the hot path. In SQLite's default rollback journal each waits for 2-3
    fsyncs: on a busy 2-core machine a delivery's two commits took p50 50 ms / p99 1.2 s at 50 deliveries/s,
    in WAL with synchronous=NORMAL p50 1.7 ms / p99 35 ms. NORMAL still survives a crash of the receiver (the
    log is in the OS's hands at commit); a power cut can lose the last commits, and a delivery re-emitted
    after that carries the same event id, which Prefect de-duplicates. The journal mode is a property of
    the file: the project database stays in WAL for every process that opens it (a local filesystem's)."""
    cursor = dbapi_conn.cursor()
    try:
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
    finally:
        cursor.close()


def _naive_utc(dt: datetime) -> datetime:
    return dt.astimezone(UTC).replace(tzinfo=None)


class DeliveryStore:
    """The deliveries table at `url`. Every method is one short transaction."""

    def __init__(self, url: str, lease_s: float) -> None:
        self.engine = project_engine(url, "webhook deliveries")
        self.lease = timedelta(seconds=lease_s)
        if self.engine.dialect.name == "sqlite":
            sa.event.listen(self.engine, "connect", _sqlite_write_ahead_log)
        migrations.ensure(self.engine, [DELIVERIES])

    def claim(self, d: Delivery, now: datetime) -> Claimed | sa.Row[Any]:
        """Claimed when this request must record `d`; else the existing row (queued or emitted, in progress
        elsewhere, or another body under the same id)."""
        token, at = uuid.uuid4().hex, _naive_utc(now)
        try:
            with self.engine.begin() as conn:
                conn.execute(_INSERT_CLAIM, {
                    "delivery_id": d.delivery_id, "endpoint": d.endpoint, "received_at": at,
                    "body_sha256": d.body_sha256, "event": d.event, "event_id": d.event_id, "outcome": "claimed",
                    "signed_with": d.signed_with, "attempts": 1, "claim": token, "claimed_at": at})
            return Claimed(token, at)
        except sa.exc.IntegrityError:
            pass  # seen before: decide from its row
        except sa.exc.SQLAlchemyError as exc:
            raise StoreUnavailable(f"deliveries database: {type(exc).__name__}") from exc
        row = self.get(d.delivery_id)
        if row is None:  # never deleted, so only a database that lost it: refuse rather than guess
            raise StoreUnavailable(f"delivery {d.delivery_id} vanished from the deliveries table")
        same = row.endpoint == d.endpoint and row.body_sha256 == d.body_sha256
        # a failed attempt, or one whose request died before queueing its event (lease over), is taken over;
        # the event id is the same, so an event that did reach Prefect anyway is de-duplicated there
        unqueued = row.outcome == "claimed" or (row.outcome == "pending" and row.event_body is None)
        retake = row.outcome == "failed" or (unqueued and row.claimed_at < at - self.lease)
        if same and retake:
            with _db_errors(), self.engine.begin() as conn:
                won = conn.execute(DELIVERIES.update().where(
                    DELIVERIES.c.delivery_id == d.delivery_id, DELIVERIES.c.claim == row.claim,
                ).values(outcome="claimed", claim=token, claimed_at=at, attempts=row.attempts + 1,
                         signed_with=d.signed_with)).rowcount == 1
            if won:
                return Claimed(token, row.received_at)
            row = self.get(d.delivery_id) or row
        return row

    def queue(self, delivery_id: str, token: str, now: datetime, event: Mapping[str, Any]) -> bool:
        """Record the event to send and mark the delivery `pending` (the outbox emits it): what a 202 promises.
        False when this request's claim was taken over meanwhile (its successor queues the same event)."""
        with _db_errors(), self.engine.begin() as conn:
            return conn.execute(_QUEUE, {"did": delivery_id, "token": token, "event_id": event["id"],
                                         "event_body": event_json(dict(event)), "at": _naive_utc(now)}
                                ).rowcount == 1

    def due(self, now: datetime, limit: int, everything: bool = False) -> list[Pending]:
        """Queued events whose next attempt is due (all of them with `everything`), oldest first."""
        q = (sa.select(DELIVERIES.c.delivery_id, DELIVERIES.c.endpoint, DELIVERIES.c.event_body,
                       DELIVERIES.c.send_attempts)
             .where(DELIVERIES.c.outcome == "pending", DELIVERIES.c.event_body.is_not(None))
             .order_by(DELIVERIES.c.received_at).limit(limit))
        if not everything:
            q = q.where(DELIVERIES.c.next_attempt_at <= _naive_utc(now))
        with _db_errors(), self.engine.connect() as conn:
            return [Pending(r.delivery_id, r.endpoint, json.loads(r.event_body), r.send_attempts or 0)
                    for r in conn.execute(q)]

    def mark_emitted(self, delivery_ids: Sequence[str], now: datetime) -> None:
        with _db_errors(), self.engine.begin() as conn:
            conn.execute(DELIVERIES.update().where(
                DELIVERIES.c.delivery_id.in_(list(delivery_ids)), DELIVERIES.c.outcome == "pending",
            ).values(outcome="emitted", finished_at=_naive_utc(now), detail=None))

    def mark_retry(self, retries: Sequence[tuple[str, int, datetime]], now: datetime, detail: str) -> None:
        """Each (delivery id, failed sends so far, when to try again) stays pending, with why it failed."""
        with _db_errors(), self.engine.begin() as conn:
            for delivery_id, attempts, at in retries:
                conn.execute(DELIVERIES.update().where(
                    DELIVERIES.c.delivery_id == delivery_id, DELIVERIES.c.outcome == "pending",
                ).values(send_attempts=attempts, next_attempt_at=_naive_utc(at), detail=detail))

    def backlog(self) -> tuple[int, datetime | None]:
        """(deliveries queued but not yet emitted, when the oldest of them was received: aware UTC)."""
        q = (sa.select(sa.func.count(), sa.func.min(DELIVERIES.c.received_at))
             .where(DELIVERIES.c.outcome == "pending", DELIVERIES.c.event_body.is_not(None)))
        with _db_errors(), self.engine.connect() as conn:
            n, oldest = conn.execute(q).one()
        return int(n), (oldest.replace(tzinfo=UTC) if oldest is not None else None)

    def fail(self, delivery_id: str, token: str, now: datetime, detail: str) -> None:
        """Not accepted after all (a decision refused or unrecorded): a retry of the delivery takes it again.
        Only while this request's claim holds: a request that lost its lease leaves the row to its successor."""
        with _db_errors(), self.engine.begin() as conn:
            conn.execute(DELIVERIES.update().where(
                DELIVERIES.c.delivery_id == delivery_id, DELIVERIES.c.claim == token,
            ).values(outcome="failed", finished_at=_naive_utc(now), detail=detail[:500]))

    def get(self, delivery_id: str) -> sa.Row[Any] | None:
        with _db_errors(), self.engine.connect() as conn:
            return conn.execute(sa.select(DELIVERIES).where(DELIVERIES.c.delivery_id == delivery_id)).first()

    def ping(self) -> None:
        with _db_errors(), self.engine.connect() as conn:
            conn.execute(sa.select(sa.func.count()).select_from(DELIVERIES).where(sa.false()))

    def dispose(self) -> None:
        self.engine.dispose()


@contextmanager
def _db_errors() -> Iterator[None]:
    """Database errors become StoreUnavailable (a 503 for the sender, who retries)."""
    try:
        yield
    except sa.exc.SQLAlchemyError as exc:
        raise StoreUnavailable(f"deliveries database: {type(exc).__name__}") from exc


# ------------------------------------------------------------------------------------------ events


class _Transient(Exception):
    """A failure worth another attempt: no connection, a timeout, 5xx, 429."""


class PrefectEvents:
    """POST {api}/events, a list of events; answers 204. Basic auth from PREFECT_API_AUTH_STRING. Called by
    the outbox sender only, never on a request's path."""

    def __init__(self, api_url: str, timeout_s: float, attempts: int, environ: Mapping[str, str]) -> None:
        self.api = api_url.rstrip("/")
        self.attempts = attempts
        auth_string = environ.get("PREFECT_API_AUTH_STRING") or ""
        user, _, password = auth_string.partition(":")
        headers = {"Authorization": f"Bearer {environ['PREFECT_API_KEY']}"} if environ.get("PREFECT_API_KEY") else {}
        self.client = httpx.Client(timeout=timeout_s, headers=headers,
                                   auth=(user, password) if auth_string else None)

    def send(self, events: list[dict[str, Any]]) -> None:
        """One POST of `events`; transient failures retried (tenacity) before Unreachable; Refusal on a 4xx."""
        retrying = Retrying(stop=stop_after_attempt(self.attempts), retry=retry_if_exception_type(_Transient),
                            wait=wait_exponential(multiplier=0.05, max=0.5), reraise=True)
        try:
            for attempt in retrying:
                with attempt:
                    self._post(events)
        except _Transient as exc:
            raise Unreachable(f"the Prefect API did not take the event(s) after {self.attempts} attempt(s) "
                              f"({exc})") from None

    def _post(self, events: list[dict[str, Any]]) -> None:
        try:
            resp = self.client.post(f"{self.api}/events", json=events)
        except httpx.TransportError as exc:
            raise _Transient(type(exc).__name__) from exc
        if resp.status_code >= 500 or resp.status_code == 429:
            raise _Transient(f"HTTP {resp.status_code}")
        if resp.status_code >= 400:
            # a refusal is no network hiccup (wrong basic auth, a schema change): say so, back off longer
            raise Refusal(f"the Prefect API refused the event(s): HTTP {resp.status_code} {resp.text[:200]}")

    def health(self) -> str | None:
        """None when the API answers /health, else why not."""
        try:
            resp = self.client.get(f"{self.api}/health", timeout=2)
        except httpx.HTTPError as exc:
            return f"unreachable ({type(exc).__name__})"
        return None if resp.status_code == 200 else f"HTTP {resp.status_code}"

    def close(self) -> None:
        self.client.close()


# ---------------------------------------------------------------------------------------- receiver


class Refused(Exception):
    """An answer other than 202: its status, detail and the problems found."""

    def __init__(self, status: int, detail: str, problems: list[str] | None = None,
                 headers: dict[str, str] | None = None) -> None:
        self.status, self.detail, self.problems, self.headers = status, detail, problems or [], headers
        super().__init__(detail)


def body_problems(exc: ValidationError) -> list[str]:
    out = []
    for err in exc.errors():
        if err["type"] == "json_invalid":
            out.append(f"malformed JSON: {(err.get('ctx') or {}).get('error', err['msg'])}")
        else:
            out.append(f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}")
    return out


@dataclass
class Receiver:
    """Everything a delivery needs once its bytes are read; framework-free so it is tested on its own."""

    secrets: list[Secret]
    store: DeliveryStore
    models: frozenset[str]  # the models `retrain` may name (the training deployment trains these)
    default_model: str
    tolerance_s: float
    clock: Callable[[], float] = time.time  # wall time: signatures, delivery records
    wait_step_s: float = 0.02
    decisions: TriggerDecisions | None = None  # where retrain requests are recorded as trigger decisions
    policy: TriggerPolicy = field(default_factory=TriggerPolicy)
    project_clock: Clock = field(default_factory=WallClock)  # the project clock (maybe simulated): decisions
    dataset: str | None = None  # the dataset the batch endpoints may name (None: any, no folder check)
    incoming: Mapping[str, Path | None] = field(default_factory=dict)  # hook name -> its incoming folder
    on_queued: Callable[[], None] = lambda: None  # wakes the outbox sender once a delivery's event is queued

    def verify(self, headers: Mapping[str, str], raw: bytes) -> Verified:
        try:
            return verify(headers.get(SIGNATURE_HEADER), headers.get(DELIVERY_HEADER), raw, self.secrets,
                          self.clock(), self.tolerance_s)
        except SignatureError as exc:
            raise Refused(401, str(exc), headers={"WWW-Authenticate": 'Flywheel-HMAC realm="webhook"'}) from None

    def parse(self, hook: Hook, raw: bytes) -> HookBody:
        try:
            body = hook.body.model_validate_json(raw)
        except ValidationError as exc:
            problems = body_problems(exc)
            raise Refused(422, "invalid body: " + "; ".join(problems[:10]), problems) from None
        if isinstance(body, RetrainBody) and body.model is not None and body.model not in self.models:
            problem = f"model: {body.model!r} is not trained here (this stack trains {sorted(self.models)})"
            raise Refused(422, "invalid body: " + problem, [problem])
        return body

    def landed(self, hook: Hook, body: HookBody) -> dict[str, Any]:
        """A batch endpoint's checked file: {"path": <absolute path>}; Refused 422 naming the field otherwise
        (another dataset, a path outside its incoming folder, no such file). Nothing for other endpoints."""
        if not isinstance(body, BatchLandedBody) or self.dataset is None:
            return {}
        if body.dataset != self.dataset:
            problem = f"dataset: {body.dataset!r} is not the dataset here ({self.dataset!r})"
            raise Refused(422, "invalid body: " + problem, [problem])
        folder = self.incoming.get(hook.name)
        if folder is None:
            problem = f"dataset: {self.dataset!r} declares no incoming folder for {hook.name} (outcomes.source)"
            raise Refused(422, "invalid body: " + problem, [problem])
        try:
            return {"path": str(resolve_landed(body.uri, folder))}
        except NotALandedBatch as exc:
            raise Refused(422, f"invalid body: uri: {exc}", [f"uri: {exc}"]) from None

    def deliver(self, hook: Hook, verified: Verified, body: HookBody, raw: bytes,
                extra: Mapping[str, Any] | None = None) -> tuple[int, BaseModel]:
        """Record the delivery (and a retrain's decision) with its event, queued for the outbox; answer
        (202, Accepted) or (200, Duplicate); Refused otherwise. Prefect is not called here."""
        d = Delivery(verified.delivery_id, hook.name, hashlib.sha256(raw).hexdigest(), hook.event,
                     str(event_id_for(verified.delivery_id)), verified.secret)
        claim = self._claim(d)
        if isinstance(claim, Duplicate):
            return 200, claim
        model = getattr(body, "model", None) or self.default_model
        occurred = claim.received_at.replace(tzinfo=UTC)
        decision = self._decide(body, model, d, claim) if isinstance(body, RetrainBody) else None
        event = build_event(hook, body, d.delivery_id, occurred, model, decision, extra)
        if not self._store(self.store.queue, d.delivery_id, claim.token, self._now(), event):
            # our lease ran out and a retry took the delivery over: it queues this same event id
            log.warning("delivery %s (%s): taken over by a retry before it was queued", d.delivery_id, hook.name)
        self.on_queued()
        log.info("delivery %s (%s, signed with %s): queued %s %s", d.delivery_id, hook.name, d.signed_with,
                 hook.event, event["id"])
        return 202, Accepted(delivery=d.delivery_id, event=hook.event, event_id=event["id"],
                             resource=event["resource"]["prefect.resource.id"],
                             decision=decision.id if decision is not None else None)

    def _decide(self, body: RetrainBody, model: str, d: Delivery, claim: Claimed) -> Decision | None:
        """Record the request as a trigger decision; the fired decision whose event to emit (this one, or the
        one a failed earlier attempt of this delivery recorded). Refused 403 when the rule is disabled."""
        if self.decisions is None:
            return None
        signal = request_signal(model=model, reason=body.reason, actor="webhook", source="webhook",
                                event_id=retrain_signal_id(d.delivery_id), delivery=d.delivery_id,
                                occurred=claim.received_at.replace(tzinfo=UTC))
        try:
            decision = self.decisions.decide_and_record(signal, self.policy, False, self.project_clock.now())
            if decision.suppressed_by == "duplicate":  # this delivery's retry: its first decision fired
                decision = self.decisions.fired_for(signal.event_id) or decision
        except sa.exc.SQLAlchemyError as exc:
            detail = f"trigger decisions database: {type(exc).__name__}"
            self._store(self.store.fail, d.delivery_id, claim.token, self._now(), detail)
            raise Refused(503, f"{detail}; nothing was started: retry this delivery",
                          headers={"Retry-After": "5"}) from None
        if not decision.fired:
            detail = f"retrain request not carried out: {decision.reason} (decision {decision.id})"
            self._store(self.store.fail, d.delivery_id, claim.token, self._now(), detail)
            raise Refused(403, detail)
        return decision

    def _claim(self, d: Delivery) -> Claimed | Duplicate:
        """Own the delivery, or the answer to a repeat (Duplicate); Refused 409: another body under this id,
        or still in progress elsewhere past the lease."""
        deadline = time.monotonic() + self.store.lease.total_seconds()
        while True:
            got = self._store(self.store.claim, d, self._now())
            if isinstance(got, Claimed):
                return got
            if got.endpoint != d.endpoint or got.body_sha256 != d.body_sha256:
                raise Refused(409, f"delivery id {d.delivery_id} was already used for another "
                                   f"{'body' if got.endpoint == d.endpoint else 'endpoint'} ({got.endpoint}, "
                                   f"{got.outcome}); a new delivery needs a new id")
            if got.outcome == "emitted" or (got.outcome == "pending" and got.event_body is not None):
                return Duplicate(of=got.event_id, delivery=d.delivery_id, event=got.event, status=got.outcome)
            # another request is recording this delivery right now: its outcome is ours
            if time.monotonic() > deadline:
                raise Refused(409, f"delivery {d.delivery_id} is being processed by another request; retry later",
                              headers={"Retry-After": "5"})
            time.sleep(self.wait_step_s)

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self.clock(), UTC)

    @staticmethod
    def _store(fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return fn(*args)
        except StoreUnavailable as exc:
            raise Refused(503, f"{exc}; nothing was started: retry this delivery",
                          headers={"Retry-After": "5"}) from None


# --------------------------------------------------------------------------------------------- app


def default_model_name(settings: Settings) -> str:
    """The model the training deployment registers: `register.model_name`, else the dataset's name."""
    if settings.register_.model_name:
        return settings.register_.model_name
    from flywheel.schemas import load_dataset  # pydantic only: the dataset definition's name

    return load_dataset(settings.resolve(settings.dataset)).name


def landing_folders(settings: Settings) -> tuple[str, dict[str, Path | None]]:
    """The dataset this stack ingests and the folder each batch endpoint's files must be under."""
    from flywheel.schemas import load_dataset  # pydantic only

    ds = load_dataset(settings.resolve(settings.dataset))
    labels = ds.outcomes.source if ds.outcomes is not None else None
    return ds.name, {"data-landed": incoming_folder(settings.resolve(ds.source)),
                     "labels-landed": incoming_folder(settings.resolve(labels)) if labels is not None else None}


def lease_seconds(settings: Settings) -> float:
    """How long a claimed delivery belongs to the request recording it (a few commits, no network call): past
    it, a retry takes the delivery over. Generous for a busy database; Prefect's speed no longer matters."""
    return 15.0


async def read_bounded(request: Request, limit: int) -> bytes:
    """The body, or Refused(413) as soon as it is known to exceed `limit` (never reads more than limit+chunk)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise Refused(400, "Content-Length: not a number")
        if int(declared) > limit:
            raise Refused(413, f"body of {declared} bytes is over the limit of {limit} (webhook.max_body_bytes)")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:  # a sender that lied about (or did not send) Content-Length
            raise Refused(413, f"body is over the limit of {limit} bytes (webhook.max_body_bytes)")
        chunks.append(chunk)
    return b"".join(chunks)


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("flywheel_webhook_requests", "webhook requests by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.verified = Counter("flywheel_webhook_verified", "deliveries verified, by the secret that matched",
                                ["secret"], registry=r)
        self.emitted = Counter("flywheel_webhook_events_emitted", "events emitted to Prefect (by the outbox sender)",
                               ["event"], registry=r)
        self.send_failures = Counter("flywheel_webhook_outbox_send_failures",
                                     "events whose send to Prefect failed (each retried later)", registry=r)
        self.seconds = Histogram("flywheel_webhook_request_seconds", "time to answer a delivery", ["endpoint"],
                                 buckets=(0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10), registry=r)


class OutboxCollector(Collector):
    """The outbox backlog, read from the deliveries table at scrape time (so it survives restarts)."""

    def __init__(self, store: DeliveryStore, clock: Callable[[], float]) -> None:
        self.store, self.clock = store, clock

    def describe(self) -> list[Metric]:
        return []  # no database read at registration time

    def collect(self) -> Iterator[Metric]:
        pending = GaugeMetricFamily("flywheel_webhook_outbox_pending",
                                    "accepted deliveries whose event is not yet emitted to Prefect")
        oldest = GaugeMetricFamily("flywheel_webhook_outbox_oldest_age_seconds",
                                   "age of the oldest delivery still waiting for its event (0 when none)")
        try:
            n, first = self.store.backlog()
        except StoreUnavailable as exc:
            log.warning("outbox metrics unavailable: %s", exc)
            return
        pending.add_metric([], n)
        oldest.add_metric([], max(0.0, self.clock() - first.timestamp()) if first is not None else 0.0)
        yield pending
        yield oldest


def create_app(settings: Settings, secrets: list[Secret], prefect_api_url: str, *,
               clock: Callable[[], float] = time.time, environ: Mapping[str, str] | None = None,
               model_name: str | None = None) -> FastAPI:
    """The receiver. Opens (and creates where missing) the deliveries table at once: a bad URL fails here."""
    if not secrets:
        raise FlywheelError("the webhook receiver needs at least one secret")
    wh = settings.webhook
    default = model_name or default_model_name(settings)
    store = DeliveryStore(settings.webhook_deliveries_url, lease_seconds(settings))
    events = PrefectEvents(prefect_api_url, wh.emit_timeout_s, wh.emit_attempts,
                           os.environ if environ is None else environ)
    decisions = TriggerDecisions(settings.audit_db_url)
    if decisions.engine.dialect.name == "sqlite":
        # a retrain adds two commits on the hot path: the deliveries' write-ahead log settings, for the same
        # reason (measured on a loaded 2-core machine: decide+record+mark_emitted p50 44 ms -> 1.7 ms)
        sa.event.listen(decisions.engine, "connect", _sqlite_write_ahead_log)
        decisions.engine.dispose()  # the connection `ensure` opened predates the listener
    policy = load_policy(settings.resolve(settings.triggers.policy_file))
    dataset, incoming = landing_folders(settings)
    metrics = Metrics()
    metrics.registry.register(OutboxCollector(store, clock))

    def emitted(rows: list[Pending]) -> None:
        for row in rows:
            metrics.emitted.labels(row.event["event"]).inc()
            decision_id = row.event.get("payload", {}).get("decision_id")
            if decision_id is not None:  # the decision's `emitted_at`: its event is out
                try:
                    decisions.mark_emitted(decision_id, datetime.fromtimestamp(clock(), UTC))
                except sa.exc.SQLAlchemyError as exc:
                    log.error("decision %s emitted but not marked: %s", decision_id, exc)

    sender = OutboxSender(store, events.send, on_emitted=emitted, on_failed=metrics.send_failures.inc,
                          batch=wh.outbox_batch, poll_s=wh.outbox_poll_s, max_backoff_s=wh.outbox_max_backoff_s,
                          linger_s=wh.outbox_linger_s,
                          now=lambda: datetime.fromtimestamp(clock(), UTC))
    receiver = Receiver(secrets=secrets, store=store, models=frozenset({default}),
                        default_model=default, tolerance_s=wh.tolerance_s, clock=clock, decisions=decisions,
                        policy=policy, project_clock=build_clock(settings.clock), dataset=dataset, incoming=incoming,
                        on_queued=sender.wake)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        sender.start()  # its first pass sends whatever an earlier process left pending
        try:
            yield
        finally:
            await run_in_threadpool(sender.stop)
            events.close()
            store.dispose()
            decisions.dispose()

    app = offline_docs_app(title="Flywheel webhook receiver", version="1", lifespan=lifespan,
                  description="HMAC-signed deliveries in, Prefect events out. See README.md, 'Webhook receiver'.")
    app.state.receiver = receiver
    app.state.metrics = metrics
    app.state.outbox = sender

    async def receive(request: Request, hook: Hook) -> JSONResponse:
        t0 = time.perf_counter()
        try:
            raw = await read_bounded(request, wh.max_body_bytes)
            verified = receiver.verify(request.headers, raw)
            metrics.verified.labels(verified.secret).inc()
            body = receiver.parse(hook, raw)
            extra = receiver.landed(hook, body)
            status, answer = await run_in_threadpool(receiver.deliver, hook, verified, body, raw, extra)
            response = JSONResponse(answer.model_dump(), status_code=status)
        except Refused as exc:
            response = JSONResponse(Problem(detail=exc.detail, problems=exc.problems).model_dump(),
                                    status_code=exc.status, headers=exc.headers)
        metrics.requests.labels(hook.name, str(response.status_code)).inc()
        metrics.seconds.labels(hook.name).observe(time.perf_counter() - t0)
        return response

    for hook in HOOKS.values():
        _route(app, hook, receive)

    @app.get("/health")
    def health() -> JSONResponse:
        """200 when the deliveries table and the Prefect API answer (so queued events go out), else 503; with
        the outbox's backlog (deliveries accepted but not yet emitted) and the age of its oldest."""
        outbox: dict[str, Any] = {"pending": None, "oldest_age_s": None, "last_error": sender.last_error}
        try:
            n, first = store.backlog()
            db = "ok"
            outbox.update(pending=n, oldest_age_s=round(max(0.0, clock() - first.timestamp()), 3) if first else 0.0)
        except StoreUnavailable as exc:
            db = str(exc)
        prefect = events.health() or "ok"
        ok = db == "ok" and prefect == "ok"
        return JSONResponse({"ok": ok, "deliveries_db": db, "prefect_api": prefect, "outbox": outbox,
                             "loop": loop_liveness()}, status_code=200 if ok else 503)

    def loop_liveness() -> dict[str, Any]:
        """The loop's liveness seen from outside (flywheel/liveness.py): detail only, it does not change the
        status, which says whether deliveries can be taken."""
        try:
            with decisions.engine.connect() as conn:
                loop = read_liveness(conn, default, dataset, receiver.project_clock.now(), policy.liveness)
        except sa.exc.SQLAlchemyError as exc:
            return {"error": f"project database: {type(exc).__name__}"}
        ages = {f"{s.what}_age_s": (round(s.age_s) if s.age_s != float("inf") else None)
                for s in (loop.monitoring, loop.outcomes)}
        return {"model": loop.model, "silent": loop.silent, **ages,
                "monitoring_max_silence_s": loop.monitoring.limit_s, "outcomes_max_silence_s": loop.outcomes.limit_s,
                "summaries": list(loop.summaries)}

    @app.get("/metrics")
    def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def _route(app: FastAPI, hook: Hook, receive: Callable[..., Any]) -> None:
    """POST /hooks/<name>. The body is read raw (its bytes are what is signed), so FastAPI does not parse it;
    the model is still documented in the OpenAPI schema."""

    async def endpoint(request: Request) -> Any:
        return await receive(request, hook)

    headers = [{"name": SIGNATURE_HEADER, "in": "header", "required": True, "schema": {"type": "string"},
                "description": "t=<unix seconds>,v1=<hex HMAC-SHA256 of '{t}.{delivery}.{body}'>"},
               {"name": DELIVERY_HEADER, "in": "header", "required": True, "schema": {"type": "string"},
                "description": "unique per delivery, the same on every retry"}]
    problem = {"model": Problem}
    app.add_api_route(
        f"/hooks/{hook.name}", endpoint, methods=["POST"], status_code=202, summary=hook.summary,
        description=f"Emits `{hook.event}`.", response_model=Accepted, name=f"hook_{hook.name.replace('-', '_')}",
        responses={200: {"model": Duplicate, "description": "a repeat of a delivery already accepted"},
                   400: problem, 401: problem, 409: problem, 413: problem, 422: problem, 403: problem, 503: problem},
        openapi_extra={"parameters": headers, "requestBody": {"required": True, "content": {
            "application/json": {"schema": hook.body.model_json_schema()}}}},
    )


# ------------------------------------------------------------------------------------------- entry


def resolve_prefect_api(settings: Settings, explicit: str | None = None) -> str:
    api = explicit or os.environ.get("PREFECT_API_URL") or settings.stores.prefect_api_url
    if not api:
        raise FlywheelError("the webhook receiver emits Prefect events and needs a running Prefect server: set "
                            "PREFECT_API_URL or stores.prefect_api_url, or start the stack with `flywheel up`")
    return api


def serve(settings: Settings, host: str | None = None, port: int | None = None,
          prefect_api_url: str | None = None) -> None:
    """Serve until stopped, with the settings the entry point loaded. Refuses to start without a secret."""
    import uvicorn

    from flywheel.credentials import require_credentials
    from flywheel.hmacsig import load_secrets

    require_credentials(settings, "webhook")
    wh = settings.webhook
    secrets = load_secrets(wh.secret_env, wh.previous_secret_env, os.environ)
    api = resolve_prefect_api(settings, prefect_api_url)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(settings, secrets, api)
    log.info("webhook receiver: events to %s, deliveries in %s, %d active secret(s)", api,
             _without_password(settings.webhook_deliveries_url), len(secrets))
    # no access log: a line per request is I/O on the request path (each delivery is logged once instead)
    uvicorn.run(app, host=host or wh.host, port=port or wh.port, access_log=False, log_level="info",
                timeout_graceful_shutdown=10)


def _without_password(url: str) -> str:
    return sa.engine.make_url(url).render_as_string(hide_password=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flywheel.webhook", description="Flywheel webhook receiver")
    parser.add_argument("--profile", "-p", default=None)
    parser.add_argument("--config-dir", default=None)
    parser.add_argument("--port", type=int, default=None)
    parser.add_argument("--host", default=None)
    args = parser.parse_args(argv)
    from flywheel.settings import apply_runtime_environment, load_settings

    try:
        settings = load_settings(profile=args.profile, config_dir=args.config_dir)
        apply_runtime_environment(settings)
        serve(settings, args.host, args.port)
    except FlywheelError as exc:
        raise SystemExit(f"error: {exc}") from None


if __name__ == "__main__":
    main()
