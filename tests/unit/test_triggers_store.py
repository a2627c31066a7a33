"""Every decision is a row of flywheel_trigger_decisions (SQLite; PostgreSQL when 127.0.0.1:5432 answers):
recorded fired and suppressed, one fire per event id even when two processes decide it at once, emitted and
run columns filled once; and the decide_trigger path outside Prefect (recorded, nothing emitted)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from flywheel import migrations
from flywheel.trigger_decisions import TABLE, TriggerDecisions
from flywheel.trigger_policy import TriggerPolicy
from flywheel.triggers import drift_signal, request_signal

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
POLICY = TriggerPolicy()


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    """A throwaway database on the local PostgreSQL (skipped when there is none)."""
    from tests.production.conftest import throwaway_database

    with throwaway_database("flywheel_triggers", migrate=True) as url:
        yield url


@pytest.fixture(params=["sqlite", "postgres"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/flywheel.db"
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def store(url: str) -> Iterator[TriggerDecisions]:
    s = TriggerDecisions(url)
    with s.engine.begin() as conn:  # the PostgreSQL database is shared by the module's tests
        conn.execute(sa.text(f"DELETE FROM {TABLE}"))
    yield s
    s.dispose()


def drift(event_id: str, model: str = "churn") -> object:
    return drift_signal(True, model=model, event_id=event_id, occurred=T0, evidence={"drifted": ["tenure"]})


def test_fired_and_suppressed_decisions_are_recorded_with_their_evidence(store: TriggerDecisions) -> None:
    fired = store.decide_and_record(drift("w-1"), POLICY, False, T0)
    held = store.decide_and_record(drift("w-2"), POLICY, False, T0 + timedelta(hours=1))
    assert fired.outcome == "fire" and held.suppressed_by == "cooldown", held.reason
    rows = store.decisions("churn")
    assert [d.id for d in rows] == [held.id, fired.id], "newest first"
    assert rows[1] == fired and rows[1].evidence == {"drifted": ["tenure"]}
    assert rows[0].reason.startswith("cooldown until 2026-03-01T18:00:00+00:00 (last retrain 2026-03-01T12:00:00")


def test_the_recorded_history_drives_the_next_decision(store: TriggerDecisions) -> None:
    store.decide_and_record(drift("w-1"), POLICY, False, T0)
    again = store.decide_and_record(drift("w-1"), POLICY, False, T0 + timedelta(days=1))
    assert again.suppressed_by == "duplicate"
    later = store.decide_and_record(drift("w-9"), POLICY, False, T0 + timedelta(hours=7))
    assert later.outcome == "fire", "the cooldown since the recorded retrain is over"
    other = store.decide_and_record(drift("w-5", model="fraud"), POLICY, False, T0 + timedelta(minutes=1))
    assert other.outcome == "fire", "cooldowns are per model"


def test_two_processes_deciding_one_signal_at_once_fire_it_once(url: str, store: TriggerDecisions) -> None:
    stores = [TriggerDecisions(url) for _ in range(2)]
    start = threading.Barrier(2)
    results = []

    def decide(s: TriggerDecisions) -> None:
        start.wait()
        results.append(s.decide_and_record(request_signal(model="churn", reason="r", actor="a", event_id="req-1",
                                                          occurred=T0), POLICY, False, T0))

    threads = [threading.Thread(target=decide, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for s in stores:
        s.dispose()
    assert sorted(d.outcome for d in results) == ["fire", "suppressed"], [d.reason for d in results]
    assert [d.suppressed_by for d in results if not d.fired] == ["duplicate"]
    assert len(store.decisions()) == 2


def test_emitted_and_flow_run_are_filled_once(store: TriggerDecisions) -> None:
    d = store.decide_and_record(drift("w-1"), POLICY, False, T0)
    assert store.mark_emitted(d.id) and not store.mark_emitted(d.id), "emitted_at is set once"
    assert store.link_run(d.id, "run-1") and not store.link_run(d.id, "run-2")
    got = store.get(d.id)
    assert got is not None and got.flow_run_id == "run-1" and got.emitted_at is not None


def test_upgrade_creates_the_trigger_and_notification_tables(tmp_path: Path) -> None:
    names = migrations.upgrade(f"sqlite:///{tmp_path}/loop.db")
    assert {"flywheel_trigger_decisions", "flywheel_notification_deliveries"} <= set(names)


# ------------------------------------------------------------------------------ the task, outside Prefect


def test_decide_trigger_outside_prefect_records_and_emits_nothing(tmp_path: Path, monkeypatch) -> None:
    import tasks.triggers as tt

    monkeypatch.setattr(tt, "prefect_api_configured", lambda: False)
    url = f"sqlite:///{tmp_path}/flywheel.db"
    decision = tt.decide_trigger.fn(drift("w-1"), POLICY, url, T0, paused=False)
    assert decision.fired and decision.emitted_at is None, "no Prefect API: fired, recorded, not emitted"
    store = TriggerDecisions(url)
    assert store.get(decision.id) == decision
    store.dispose()


def test_a_repeat_sends_the_event_a_fired_decision_never_sent(tmp_path: Path, monkeypatch) -> None:
    import tasks.triggers as tt

    url = f"sqlite:///{tmp_path}/flywheel.db"
    monkeypatch.setattr(tt, "emit_retrain_event", lambda d: False)  # the server was down
    first = tt.decide_record_emit(drift("w-1"), POLICY, url, T0, paused=False)
    sent = []
    monkeypatch.setattr(tt, "emit_retrain_event", lambda d: sent.append(d.id) or True)
    repeat = tt.decide_record_emit(drift("w-1"), POLICY, url, T0 + timedelta(minutes=5), paused=False)
    assert repeat.suppressed_by == "duplicate" and sent == [first.id], "the original decision's event, once"
    store = TriggerDecisions(url)
    assert store.get(first.id).emitted_at is not None  # type: ignore[union-attr]
    store.dispose()
    tt.decide_record_emit(drift("w-1"), POLICY, url, T0 + timedelta(minutes=6), paused=False)
    assert sent == [first.id], "sent once: a later repeat finds it emitted"


def test_paused_is_asked_of_the_loop_control_for_automatic_signals_only(tmp_path: Path, monkeypatch) -> None:
    import tasks.triggers as tt

    monkeypatch.setattr(tt, "prefect_api_configured", lambda: False)
    asked = []
    monkeypatch.setattr(tt, "loop_pause", lambda url, model: asked.append(model) or "loop paused by user:ana")
    url = f"sqlite:///{tmp_path}/flywheel.db"
    held = tt.decide_trigger.fn(drift("w-1"), POLICY, url, T0)
    assert (held.suppressed_by, held.reason) == ("paused", "loop paused (loop paused by user:ana)")
    req = request_signal(model="churn", reason="r", actor="a", event_id="req-1", occurred=T0)
    assert tt.decide_trigger.fn(req, POLICY, url, T0).fired and asked == ["churn"], \
        "an explicit request is not held by a pause, so the loop control is not asked"


def test_loop_pause_reads_the_loop_control(tmp_path: Path) -> None:
    from flywheel.loopcontrol import LoopControl
    from tasks.triggers import loop_pause

    url = f"sqlite:///{tmp_path}/flywheel.db"
    assert loop_pause(url, "churn") is None, "a loop never paused runs"
    control = LoopControl(url)
    control.pause("churn", "user:ops", "incident review")
    control.dispose()
    reason = loop_pause(url, "churn")
    assert reason is not None and "incident review" in reason, reason
    held = TriggerDecisions(url)
    decision = held.decide_and_record(drift("w-9"), POLICY, reason, T0)
    held.dispose()
    assert not decision.fired and decision.suppressed_by == "paused", decision


def test_the_artifact_shows_the_outcome_reason_and_evidence(tmp_path: Path) -> None:
    from tasks.triggers import render_decision

    store = TriggerDecisions(f"sqlite:///{tmp_path}/flywheel.db")
    store.decide_and_record(drift("w-1"), POLICY, False, T0)
    held = store.decide_and_record(drift("w-2"), POLICY, False, T0 + timedelta(hours=1))
    store.dispose()
    md = render_decision(held)
    assert "**suppressed** (cooldown): cooldown until 2026-03-01T18:00:00+00:00" in md
    assert "| drifted | ['tenure'] |" in md and f"`{held.id}`" in md
