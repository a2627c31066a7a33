"""The outbox sender (flywheel/outbox.py) over a real deliveries table in SQLite. Prefect is the outside world
here: `send` stands in for its POST /api/events (down, refusing, up); the integration tests use the real one."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from flywheel.clock import ManualClock
from flywheel.outbox import OutboxSender, Pending, Refusal, Unreachable, backoff
from flywheel.webhook import HOOKS, Claimed, Delivery, DeliveryStore, RetrainBody, build_event, event_id_for

T0 = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


class Prefect:
    """What the sender posts to: `state` says whether it is down, refusing some ids, or up."""

    def __init__(self) -> None:
        self.state = "up"
        self.refuse: set[str] = set()
        self.posts: list[list[str]] = []

    def send(self, events: list[dict[str, Any]]) -> None:
        if self.state == "down":
            raise Unreachable("the Prefect API did not take the event(s) after 3 attempt(s) (ConnectError)")
        if self.refuse & {e["id"] for e in events}:
            raise Refusal("the Prefect API refused the event(s): HTTP 422")
        self.posts.append([e["id"] for e in events])

    @property
    def stored(self) -> list[str]:
        return [i for post in self.posts for i in post]


@pytest.fixture
def store(tmp_path: Path) -> DeliveryStore:
    s = DeliveryStore(f"sqlite:///{tmp_path}/flywheel.db", lease_s=15)
    yield s
    s.dispose()


def queue(store: DeliveryStore, n: int, at: datetime = T0) -> list[str]:
    """n accepted deliveries, queued as the receiver queues them; their event ids, oldest first."""
    ids = []
    for i in range(n):
        did = f"o-{uuid.uuid4().hex[:8]}"
        d = Delivery(did, "data-landed", "a" * 64, "flywheel.data.landed", str(event_id_for(did)), "current")
        claim = store.claim(d, at + timedelta(milliseconds=i))
        assert isinstance(claim, Claimed)
        event = build_event(HOOKS["retrain"], RetrainBody(reason="r"), did, at, "churn")
        assert store.queue(did, claim.token, at, event)
        ids.append(event["id"])
    return ids


def outcomes(store: DeliveryStore) -> dict[str, str]:
    import sqlalchemy as sa

    from flywheel.webhook import DELIVERIES

    with store.engine.connect() as conn:
        return {r.event_id: r.outcome for r in conn.execute(sa.select(DELIVERIES))}


def test_pending_events_go_out_in_batches_and_are_marked_emitted(store: DeliveryStore) -> None:
    ids = queue(store, 5)
    prefect, seen = Prefect(), []
    sender = OutboxSender(store, prefect.send, on_emitted=seen.extend, batch=2, now=lambda: T0)
    assert sender.drain() == 5
    assert prefect.posts == [ids[0:2], ids[2:4], ids[4:5]], "oldest first, two per POST"
    assert set(outcomes(store).values()) == {"emitted"} and [p.event["id"] for p in seen] == ids
    assert sender.drain() == 0 and store.backlog() == (0, None)


def test_prefect_down_keeps_them_pending_with_a_growing_back_off_and_loses_nothing(store: DeliveryStore) -> None:
    ids = queue(store, 3)
    clock, prefect, failed = ManualClock(T0), Prefect(), []
    prefect.state = "down"
    sender = OutboxSender(store, prefect.send, on_failed=failed.append, max_backoff_s=2, now=clock.now)
    assert sender.drain() == 0
    assert set(outcomes(store).values()) == {"pending"} and failed == [3]
    assert "did not take the event" in sender.last_error
    clock.advance(timedelta(seconds=0.4))
    assert sender.drain() == 0 and failed == [3], "not due before its back-off (0.5 s after the first failure)"
    clock.advance(timedelta(seconds=0.1))
    assert sender.drain() == 0 and failed == [3, 3], "due again, still down: the back-off doubles"
    assert [p.send_attempts for p in store.due(clock.now(), 10, everything=True)] == [2, 2, 2]
    assert store.backlog() == (3, T0)

    prefect.state = "up"
    clock.advance(timedelta(seconds=1))
    assert sender.drain() == 3 and prefect.stored == ids and sender.last_error is None
    assert set(outcomes(store).values()) == {"emitted"}


def test_one_refused_event_does_not_hold_back_the_others(store: DeliveryStore) -> None:
    ids = queue(store, 3)
    prefect = Prefect()
    prefect.refuse = {ids[1]}
    sender = OutboxSender(store, prefect.send, now=lambda: T0)
    assert sender.drain() == 2
    assert prefect.stored == [ids[0], ids[2]]
    assert outcomes(store) == {ids[0]: "emitted", ids[1]: "pending", ids[2]: "emitted"}
    (row,) = store.due(T0, 10, everything=True)
    assert row.send_attempts == 1


def test_the_back_off_doubles_up_to_its_cap() -> None:
    assert [backoff(n, 30).total_seconds() for n in (1, 2, 3, 4, 7, 8, 20)] == [0.5, 1, 2, 4, 30, 30, 30]


def test_a_start_resends_what_an_earlier_process_left_pending_even_before_its_back_off(
        store: DeliveryStore) -> None:
    ids = queue(store, 2)
    far = datetime.now(UTC) + timedelta(hours=1)  # a long back-off recorded by the process that crashed
    store.mark_retry([(d, 9, far) for d in (p.delivery_id for p in store.due(T0, 10, everything=True))],
                     T0, "left behind")
    prefect, seen = Prefect(), []
    sender = OutboxSender(store, prefect.send, on_emitted=seen.extend, poll_s=0.05)
    sender.start()
    try:
        deadline = time.monotonic() + 10
        while len(seen) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        sender.stop()
    assert prefect.stored == ids and set(outcomes(store).values()) == {"emitted"}


def test_a_queued_row_wakes_the_running_sender(store: DeliveryStore) -> None:
    prefect, seen = Prefect(), []
    sender = OutboxSender(store, prefect.send, on_emitted=seen.extend, poll_s=60)  # never by polling
    sender.start()
    try:
        time.sleep(0.2)  # its first pass found nothing; it now waits up to 60 s
        ids = queue(store, 1)
        sender.wake()
        deadline = time.monotonic() + 10
        while not seen and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        sender.stop()
    assert [p.event["id"] for p in seen] == ids
    assert isinstance(seen[0], Pending)
