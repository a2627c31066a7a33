"""Volume, staleness and liveness as the monitoring run checks them (`act_on_champion_state`, decisions in a real
SQLite file, alarms to a real local receiver): each fires alone, each stays quiet below its threshold, the
same condition is decided once, and the cooldown and the pause hold the automatic ones."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from flywheel.loopcontrol import LoopControl
from flywheel.settings import NotifyConfig
from flywheel.trigger_decisions import TriggerDecisions
from flywheel.trigger_policy import TriggerPolicy
from flywheel.triggers import ChampionState, loop_signals
from tasks.triggers import act_on_champion_state

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
POLICY = TriggerPolicy()  # volume 5000 rows, stale after 30d, cooldown 6h, silences 3h / 2d
NOTIFY = NotifyConfig()


def state(rows: int = 0, age: timedelta = timedelta(days=1), outcome_ago: timedelta | None = timedelta(hours=1),
          monitored_ago: timedelta | None = timedelta(hours=1), version: str = "3") -> ChampionState:
    # each version trained when it was registered (days apart, so a new champion is a new training)
    trained = T0 - age + timedelta(minutes=int(version))
    return ChampionState(model="churn", version=version, registered_at=T0 - age, last_training_at=trained,
                     new_labelled_rows=rows,
                     last_outcome_at=T0 - outcome_ago if outcome_ago is not None else None,
                     last_monitoring_at=T0 - monitored_ago if monitored_ago is not None else None)


@pytest.fixture
def db(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/flywheel.db"


def act(db: str, s: ChampionState, now: datetime = T0):
    decisions, alarms = act_on_champion_state.fn(s, POLICY, NOTIFY, db, now)
    return {d.kind: d for d in decisions}, alarms


def test_a_quiet_fresh_champion_fires_nothing_and_raises_no_alarm(db: str) -> None:
    decided, alarms = act(db, state(rows=4999))
    assert decided["volume_reached"].suppressed_by == "too_few_rows", decided["volume_reached"].reason
    assert "4999 new labelled rows" in decided["volume_reached"].reason
    assert decided["model_stale"].suppressed_by == "below_threshold", decided["model_stale"].reason
    assert alarms == []


def test_volume_alone_fires_once_per_multiple_of_the_threshold(db: str) -> None:
    decided, _ = act(db, state(rows=5000))
    assert decided["volume_reached"].outcome == "fire" and decided["model_stale"].outcome == "suppressed"
    trained = (T0 - timedelta(days=1) + timedelta(minutes=3)).isoformat()
    assert decided["volume_reached"].event_id == f"volume_reached:churn:{trained}:x1"
    assert decided["volume_reached"].evidence["version"] == "3"
    again, _ = act(db, state(rows=7000), T0 + timedelta(hours=7))  # after the cooldown: the same condition
    assert again["volume_reached"].suppressed_by == "duplicate", again["volume_reached"].reason
    doubled, _ = act(db, state(rows=10_000), T0 + timedelta(hours=8))
    assert doubled["volume_reached"].outcome == "fire", "twice the threshold is a new condition"


def test_volume_of_a_new_champion_is_a_new_condition(db: str) -> None:
    act(db, state(rows=5000))
    later, _ = act(db, state(rows=5000, version="4"), T0 + timedelta(hours=7))
    assert later["volume_reached"].outcome == "fire", later["volume_reached"].reason


def test_staleness_alone_fires_once_per_period(db: str) -> None:
    decided, _ = act(db, state(age=timedelta(days=30)))
    assert decided["model_stale"].outcome == "fire" and decided["volume_reached"].outcome == "suppressed"
    assert decided["model_stale"].event_id == "model_stale:churn:v3:1"
    again, _ = act(db, state(age=timedelta(days=31)), T0 + timedelta(days=1))
    assert again["model_stale"].suppressed_by == "duplicate", again["model_stale"].reason
    older, _ = act(db, state(age=timedelta(days=60)), T0 + timedelta(days=30))
    assert older["model_stale"].outcome == "fire", "a further max_age period"


def test_the_cooldown_holds_volume_and_staleness(db: str) -> None:
    decided, _ = act(db, state(rows=5000, age=timedelta(days=30)))
    assert decided["volume_reached"].outcome == "fire"
    assert decided["model_stale"].suppressed_by == "cooldown", "the volume retrain just fired"


def test_a_paused_loop_records_both_as_suppressed(db: str) -> None:
    control = LoopControl(db)
    try:
        control.pause("churn", actor="user:ana", reason="label audit")
    finally:
        control.dispose()
    decided, _ = act(db, state(rows=6000, age=timedelta(days=40)))
    assert {k: d.suppressed_by for k, d in decided.items()} == {"volume_reached": "paused", "model_stale": "paused"}
    store = TriggerDecisions(db)
    try:
        assert {d.kind for d in store.decisions("churn")} == {"volume_reached", "model_stale"}, "recorded"
    finally:
        store.dispose()


def test_silent_monitoring_alone_is_an_alarm(db: str) -> None:
    _, alarms = act(db, state(monitored_ago=timedelta(hours=4)))
    assert [a.evidence["silent"] for a in alarms] == ["monitoring"], alarms
    assert alarms[0].severity == "critical" and "no judged monitoring window for 4.0 hours" in alarms[0].summary


def test_silent_outcomes_alone_are_an_alarm(db: str) -> None:
    _, alarms = act(db, state(outcome_ago=timedelta(days=3)))
    assert [a.evidence["silent"] for a in alarms] == ["outcomes"], alarms
    _, never = act(db, state(outcome_ago=None, age=timedelta(days=3)))
    assert [a.evidence["silent"] for a in never] == ["outcomes"], "none ever, 3 days after the champion started"
    _, young = act(db, state(outcome_ago=None, age=timedelta(days=1)))
    assert young == [], "no outcome yet, but the champion is a day old: within the 2-day silence"


def test_loop_signals_name_the_champion_in_their_evidence() -> None:
    volume, stale = loop_signals(state(rows=12_000), POLICY, T0)
    trained = (T0 - timedelta(days=1) + timedelta(minutes=3)).isoformat()
    assert volume.event_id == f"volume_reached:churn:{trained}:x2" and volume.evidence["new_labelled_rows"] == 12_000
    assert stale.evidence["version"] == "3" and stale.verdict == "below_threshold"
