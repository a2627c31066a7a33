"""The webhook receiver's outbox sender: emits the events that accepted deliveries queued, off the request path.

A delivery is answered 202 as soon as its row (with the event to send) is committed `pending`; this sender,
a thread of the receiver's process started in its lifespan, posts pending events to Prefect in batches and
marks them `emitted` (a transactional outbox). Nothing is lost when Prefect is down: the rows stay pending,
each retried after an exponential back-off (`webhook.outbox_max_backoff_s` at most), and the first pass
after a start sends every pending row whatever its back-off, which recovers what a crash left behind.
A double send (a crash between the POST and the mark, or two receivers on one database) is harmless:
Prefect de-duplicates by event id, and every event id is derived from its delivery.

Framework-free and store-agnostic: it talks to the deliveries store and the events client through the
small protocols below, so it is tested on its own.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

log = logging.getLogger("flywheel.webhook.outbox")


class Refusal(Exception):
    """Prefect answered the batch with a client error (4xx): no retry helps until something is fixed."""


class Unreachable(Exception):
    """Prefect could not be reached or failed (connection, timeout, 5xx, 429) after the client's retries."""


@dataclass(frozen=True)
class Pending:
    """One queued event: its delivery, endpoint, event (as sent) and how many sends already failed."""

    delivery_id: str
    endpoint: str
    event: dict[str, Any]
    send_attempts: int


class OutboxStore(Protocol):
    def due(self, now: datetime, limit: int, everything: bool) -> list[Pending]: ...
    def mark_emitted(self, delivery_ids: Sequence[str], now: datetime) -> None: ...
    def mark_retry(self, retries: Sequence[tuple[str, int, datetime]], now: datetime, detail: str) -> None: ...


def backoff(send_attempts: int, cap_s: float, base_s: float = 0.5) -> timedelta:
    """The wait before the next send after `send_attempts` failed ones: 0.5 s, 1 s, 2 s, ... capped."""
    return timedelta(seconds=min(cap_s, base_s * 2 ** max(0, send_attempts - 1)))


class OutboxSender:
    """Drains the outbox: `wake()` after a row is queued; `start()` / `stop()` from the app's lifespan."""

    def __init__(self, store: OutboxStore, send: Callable[[list[dict[str, Any]]], None], *,
                 on_emitted: Callable[[list[Pending]], None] | None = None,
                 on_failed: Callable[[int], None] | None = None, batch: int = 100, poll_s: float = 1.0,
                 max_backoff_s: float = 30.0, linger_s: float = 0.0,
                 now: Callable[[], datetime] | None = None) -> None:
        self.store, self.send = store, send
        self.on_emitted, self.on_failed = on_emitted, on_failed
        self.batch, self.poll_s, self.max_backoff_s, self.linger_s = batch, poll_s, max_backoff_s, linger_s
        self.now = now or (lambda: datetime.now(UTC))  # wall: Prefect's events and their retry back-off
        self._wake, self._stop = threading.Event(), threading.Event()
        self._thread: threading.Thread | None = None
        self.last_error: str | None = None  # why the last send failed; None once one succeeds

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="webhook-outbox", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop after the batch in flight; what is still pending stays in the table for the next start."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _run(self) -> None:
        everything = True  # the first pass after a start resends whatever is pending (crash recovery)
        while not self._stop.is_set():
            self._wake.clear()  # cleared before reading, so a row queued meanwhile wakes the next wait
            try:
                self.drain(everything)
                everything = False
            except Exception:  # the store is down: keep the thread alive and try again at the next poll
                log.exception("outbox: could not read or update the deliveries table")
            if self._wake.wait(self.poll_s) and self.linger_s:
                # woken by a new delivery: let a few more arrive, so one POST and one commit carry them all
                # (a commit per event competes with the requests' own for the database's write lock)
                self._stop.wait(self.linger_s)

    def drain(self, everything: bool = False) -> int:
        """Send what is due, batch by batch, until nothing is or a send fails; the number emitted."""
        emitted = 0
        while not self._stop.is_set():
            rows = self.store.due(self.now(), self.batch, everything)
            if not rows:
                return emitted
            sent = self._send(rows)
            emitted += sent
            if sent < len(rows) or len(rows) < self.batch:
                return emitted
            everything = False
        return emitted

    def _send(self, rows: list[Pending]) -> int:
        try:
            self.send([r.event for r in rows])
        except Unreachable as exc:
            self._retry(rows, str(exc))
            return 0
        except Refusal as exc:
            if len(rows) == 1:
                self._retry(rows, str(exc))
                return 0
            # one bad event must not hold back the rest: send them one by one
            return sum(self._send([row]) for row in rows)
        self.last_error = None
        self.store.mark_emitted([r.delivery_id for r in rows], self.now())
        if self.on_emitted is not None:
            self.on_emitted(rows)
        return len(rows)

    def _retry(self, rows: list[Pending], detail: str) -> None:
        now = self.now()
        self.last_error = detail
        retries = [(r.delivery_id, r.send_attempts + 1, now + backoff(r.send_attempts + 1, self.max_backoff_s))
                   for r in rows]
        self.store.mark_retry(retries, now, detail[:500])
        if self.on_failed is not None:
            self.on_failed(len(rows))
        log.warning("outbox: %d event(s) not sent, retried from %s: %s", len(rows),
                    min(at for _, _, at in retries).isoformat(timespec="seconds"), detail)


def event_json(event: dict[str, Any]) -> str:
    return json.dumps(event, separators=(",", ":"), sort_keys=True)
