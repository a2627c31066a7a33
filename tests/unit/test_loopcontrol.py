"""Loop pause/resume (flywheel/loopcontrol.py), supersede requests (flywheel/rollout_controls.py) and the
challenger queue's pure rules (flywheel/challenger_queue.py), on a real SQLite project database."""

from __future__ import annotations

import pickle
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from flywheel import migrations
from flywheel.challenger_queue import QueuedVersion, in_flight, is_stale, plan_release
from flywheel.locks import LockInfo
from flywheel.loopcontrol import LoopControl, LoopEvent, loop_paused, loop_state, trigger_suppression
from flywheel.rollout_controls import RolloutControls, RolloutSuperseded

T0 = datetime(2026, 11, 24, 10, 0, tzinfo=UTC)


def _event(i: int, model: str, action: str, minutes: int) -> LoopEvent:
    return LoopEvent(id=i, at=T0 + timedelta(minutes=minutes), model=model, action=action, actor=f"user:{i}",
                     reason=f"why {i}")


# ---------------------------------------------------------------------------------- pure loop rules


def test_loop_state_is_decided_by_the_models_last_event() -> None:
    assert loop_state([], "churn").paused is False and not loop_paused([], "churn")
    events = [_event(1, "churn", "pause", 0), _event(2, "loans", "pause", 1), _event(3, "churn", "resume", 2)]
    assert not loop_paused(events, "churn"), "resumed after the pause"
    assert loop_paused(events, "loans"), "another model's events are its own"
    paused = loop_state([*events, _event(4, "churn", "pause", 3)], "churn")
    assert (paused.paused, paused.actor, paused.reason, paused.since) == (True, "user:4", "why 4",
                                                                         T0 + timedelta(minutes=3))
    # order of the rows does not matter: time (then id) does
    assert loop_paused(list(reversed([*events, _event(4, "churn", "pause", 3)])), "churn")


def test_trigger_suppression_names_who_paused_and_why() -> None:
    assert trigger_suppression(loop_state([], "churn")) is None
    state = loop_state([_event(7, "churn", "pause", 0)], "churn")
    reason = trigger_suppression(state)
    assert reason is not None and "suppressed" in reason and "user:7" in reason and "why 7" in reason


# ---------------------------------------------------------------------------------------- the store


def test_pause_and_resume_are_recorded_with_who_when_why(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/flywheel.db"
    loop = LoopControl(url)
    assert not loop.paused("churn") and loop.trigger_suppression("churn") is None
    with pytest.raises(ValueError, match="needs a reason"):
        loop.pause("churn", "user:ana", "  ")

    state, recorded = loop.pause("churn", "user:ana", "holiday freeze", at=T0)
    assert recorded and state.paused and (state.actor, state.reason, state.since) == ("user:ana", "holiday freeze",
                                                                                     T0)
    again, recorded = loop.pause("churn", "user:bob", "another reason", at=T0 + timedelta(minutes=1))
    assert not recorded and again.actor == "user:ana", "a second pause records nothing and keeps the first"
    assert "holiday freeze" in (loop.trigger_suppression("churn") or "")
    # another process sees it (the state is in the database)
    assert LoopControl(url).paused("churn") and not LoopControl(url).paused("loans")

    state, recorded = loop.resume("churn", "user:bob", "freeze over", at=T0 + timedelta(hours=1))
    assert recorded and not state.paused and loop.trigger_suppression("churn") is None
    _, recorded = loop.resume("churn", "user:bob", "again")
    assert not recorded
    assert [(e.action, e.actor, e.reason) for e in loop.history("churn")] == [
        ("pause", "user:ana", "holiday freeze"), ("resume", "user:bob", "freeze over")]
    loop.dispose()


def test_the_migration_path_creates_the_control_tables(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/fresh.db"
    tables = migrations.upgrade(url)
    assert {"flywheel_loop_events", "flywheel_rollout_controls"} <= set(tables)
    engine = sa.create_engine(url)
    assert {"flywheel_loop_events", "flywheel_rollout_controls"} <= set(sa.inspect(engine).get_table_names())
    engine.dispose()


def test_a_supersede_request_stops_only_the_rollout_it_names(tmp_path: Path) -> None:
    controls = RolloutControls(f"sqlite:///{tmp_path}/flywheel.db")
    controls.check("churn", "prefect-flow-run:a")  # nothing requested: no error
    controls.request_supersede("churn", "prefect-flow-run:a", "7", "user:ana", "v7 fixes the bug", at=T0)
    with pytest.raises(RolloutSuperseded, match=r"superseded by user:ana .* in favour of v7: v7 fixes the bug") as err:
        controls.check("churn", "prefect-flow-run:a")
    controls.check("churn", "prefect-flow-run:b")  # the next rollout is not affected
    controls.check("loans", "prefect-flow-run:a")
    copy = pickle.loads(pickle.dumps(err.value))  # Prefect may hand a task's exception back as a copy
    assert isinstance(copy, RolloutSuperseded) and copy.request == err.value.request
    assert [r.version for r in controls.history("churn")] == ["7"]


# ------------------------------------------------------------------------------- pure queue rules


def test_a_rollout_is_in_flight_while_its_lease_runs() -> None:
    lock = LockInfo(model="churn", holder="run-a", acquired_at=T0, expires_at=T0 + timedelta(seconds=60))
    assert in_flight(lock, T0 + timedelta(seconds=59))
    assert not in_flight(lock, T0 + timedelta(seconds=61)), "a crashed rollout's expired lock holds nothing up"
    assert not in_flight(None, T0)


def test_the_newest_queued_version_is_released_and_older_ones_superseded() -> None:
    queued = [QueuedVersion(version="5", gated_against="2"), QueuedVersion(version="12", gated_against="2"),
              QueuedVersion(version="9", gated_against="2")]
    plan = plan_release(queued, champion="2")
    assert (plan.release, plan.stale, plan.superseded) == ("12", None, ["9", "5"]), "12 > 9 > 5 as numbers"
    assert plan_release([], "2").release is None


def test_a_queued_version_gated_against_a_replaced_champion_is_stale() -> None:
    queued = [QueuedVersion(version="4", gated_against="2"), QueuedVersion(version="5", gated_against="2")]
    plan = plan_release(queued, champion="3")  # the rollout it waited behind promoted v3
    assert (plan.release, plan.stale, plan.gated_against, plan.superseded) == (None, "5", "2", ["4"])
    assert is_stale(None, "1"), "gated with no champion, but there is one now"
    assert not is_stale(None, None) and not is_stale("2", "2")
    first = plan_release([QueuedVersion(version="1", gated_against=None)], champion=None)
    assert first.release == "1", "a first model queued while paused is released as the champion"


# ---------------------------------------------------------------------------------------------- CLI


def test_loop_cli_pause_status_resume_and_supersede_without_a_rollout(home: Path) -> None:
    import json

    from typer.testing import CliRunner

    from flywheel.cli import app

    runner = CliRunner()
    base = ["--profile", "ci", "--config-dir", str(home / "configs")]
    missing = runner.invoke(app, ["loop", "pause", *base])
    assert missing.exit_code == 2 and "--reason" in missing.output, "a pause needs a reason"

    r = runner.invoke(app, ["loop", "pause", "--reason", "label delay", *base])
    assert r.exit_code == 0 and "loop paused by user:" in r.output and "label delay" in r.output, r.output
    r = runner.invoke(app, ["loop", "pause", "--reason", "again", *base])
    assert r.exit_code == 0 and "already paused, nothing recorded" in r.output, r.output
    status = json.loads(runner.invoke(app, ["loop", "status", *base]).stdout)
    assert (status["model"], status["paused"], status["reason"], status["queued"]) == ("churn", True, "label delay", [])
    assert status["actor"].startswith("user:") and len(status["history"]) == 1

    r = runner.invoke(app, ["loop", "resume", "--reason", "labels back", *base])
    assert r.exit_code == 0 and "running" in r.output and "nothing queued" in r.output, r.output
    assert json.loads(runner.invoke(app, ["loop", "status", *base]).stdout)["paused"] is False

    r = runner.invoke(app, ["rollout", "supersede", *base])
    assert r.exit_code == 2 and "no rollout of 'churn' is in flight" in r.output, r.output
