"""The challenger queue on a real MLflow registry (SQLite + local artifacts in tmp) and a real project database:
registration while a rollout holds the lock (queued, no alias move), without one (challenger at once), the
hand-off when the lock frees (newest released, older superseded, stale when the champion changed), the
paused loop, and the supersede command's registry side. The rollout flow's part (a real service, real
traffic, the end-of-rollout hand-off and `flywheel rollout supersede`) is in test_rollout_flow.py."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sklearn.pipeline import Pipeline

from flywheel import registry as reg
from flywheel.challenger_queue import QueueError, claim_supersede, finish_supersede, hand_off
from flywheel.locks import RolloutLocks
from flywheel.loopcontrol import LoopControl
from flywheel.rollout_controls import RolloutControls, RolloutSuperseded
from flywheel.schemas import GateReport, GateResult
from tests.integration.test_registry import env, frame, lr_pipeline, xy  # noqa: F401 (fixtures)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

RUNNING = "prefect-flow-run:rollout-of-v2"


def _report(champion: str | None, passed: bool = True) -> GateReport:
    return GateReport(champion_version=champion, results=[
        GateResult(rule="primary", value=0.8 if passed else 0.5, threshold=">= 0.6", passed=passed)])


class Loop:
    """Registration through the real register_model task, and the stores it decides with."""

    def __init__(self, stores: dict[str, Any], pipeline: Pipeline, x: Any) -> None:
        self.env, self.pipeline, self.x = stores, pipeline, x.head(5)
        self.registry: reg.Registry = stores["registry"]
        self.url = stores["audit"].url
        self.locks, self.loop, self.controls = RolloutLocks(self.url), LoopControl(self.url), RolloutControls(self.url)

    def register(self, gated_against: str | None, run_id: str | None = None, passed: bool = True) -> Any:
        from tasks.register import register_model

        client = self.env["client"]
        if run_id is None:
            run_id = client.create_run(self.env["experiment_id"]).info.run_id
            client.set_terminated(run_id)
        return register_model.fn(self.pipeline, self.x, run_id, "churn", _report(gated_against, passed), None, {},
                                 self.env["uri"], self.url, "prefect-flow-run:training")

    def status(self, version: str) -> str:
        return self.registry.version_tags("churn", version)[reg.TAG_STATUS]

    def queue_log(self) -> list[tuple[str | None, str | None, str]]:
        return [(e.from_version, e.to_version, e.reason) for e in self.env["audit"].entries("churn", reg.QUEUE)]

    def hand_off(self, why: str) -> Any:
        return hand_off(self.registry, self.locks, self.loop, "churn", "prefect-flow-run:rollout-of-v2", why)


@pytest.fixture
def loop(env: dict[str, Any], lr_pipeline: Pipeline, xy: Any) -> Loop:  # noqa: F811
    return Loop(env, lr_pipeline, xy[0])


def _champion_and_challenger(loop: Loop) -> None:
    assert loop.register(None).outcome == "champion"
    second = loop.register("1")
    assert (second.outcome, second.alias, second.version) == ("challenger", "challenger", "2")


def test_without_a_rollout_in_flight_a_candidate_is_challenger_at_once(loop: Loop) -> None:
    _champion_and_challenger(loop)
    assert loop.registry.aliases("churn") == {"champion": "1", "challenger": "2"}
    last = loop.env["audit"].entries("churn")[-1]
    assert (last.alias, last.from_version, last.to_version) == ("challenger", None, "2")
    assert last.reason == "passed gates against the champion v1"
    assert loop.registry.version_tags("churn", "2")[reg.TAG_GATED_AGAINST] == "1"
    # the decision was taken under the rollout lock, held for it alone
    assert loop.locks.current("churn") is None
    assert [e.event for e in loop.locks.history("churn")][-2:] == ["acquired", "released"]
    assert loop.queue_log() == []


def test_a_candidate_registered_during_a_rollout_is_queued_and_released_when_it_ends(loop: Loop) -> None:
    _champion_and_challenger(loop)
    loop.locks.acquire("churn", RUNNING, 600)  # the rollout of v2 in flight
    third, fourth = loop.register("1"), loop.register("1")
    for r in (third, fourth):
        assert (r.outcome, r.alias, r.event) == ("queued", None, None)
        assert r.reason == f"queued behind rollout of v2 by {RUNNING}"
    # no alias moved: the rollout's service keeps serving (and its guards keep judging) v2
    assert loop.registry.aliases("churn") == {"champion": "1", "challenger": "2"}
    tags = loop.registry.version_tags("churn", "4")
    assert (tags[reg.TAG_STATUS], tags[reg.TAG_GATED_AGAINST]) == ("queued", "1")
    assert tags[reg.TAG_QUEUED_REASON] == f"queued behind rollout of v2 by {RUNNING}"
    assert loop.queue_log() == [(None, "3", third.reason), (None, "4", fourth.reason)]
    entry = loop.env["audit"].entries("churn", reg.QUEUE)[-1]
    assert entry.actor == "prefect-flow-run:training" and entry.evidence["rollout_holder"] == RUNNING
    assert entry.evidence["running_challenger"] == "2" and entry.evidence["gates"]["passed"] is True
    # a retry of the registration finds the decision made: nothing recorded twice
    again = loop.register("1", run_id=loop.registry.model_version("churn", "4").run_id)
    assert (again.version, again.outcome, again.reason) == ("4", "queued", fourth.reason)
    assert len(loop.queue_log()) == 2

    # while the rollout holds the lock, a hand-off moves nothing
    assert "in flight" in (loop.hand_off("test").skipped or "")
    # the rollout ends (rolled back: champion kept), releases its lock, hands off
    loop.registry.remove_alias("churn", "challenger", "rollout rolled_back: guard breach", RUNNING)
    assert loop.locks.release("churn", RUNNING)
    done = loop.hand_off("rollout of v2 ended (rolled_back)")
    assert (done.released, done.alias, done.superseded, done.stale) == ("4", "challenger", ["3"], None)
    assert loop.registry.aliases("churn") == {"champion": "1", "challenger": "4"}
    assert (loop.status("3"), loop.status("4")) == ("superseded", "challenger")
    move = loop.env["audit"].entries("churn", "challenger")[-1]
    assert (move.from_version, move.to_version) == (None, "4")
    assert move.reason == ("released from the queue after rollout of v2 ended (rolled_back): passed gates against "
                           "the champion v1")
    assert loop.queue_log()[2:] == [
        ("3", None, "superseded by queued v4 at the hand-off after rollout of v2 ended (rolled_back)"),
        ("4", None, "released to challenger after rollout of v2 ended (rolled_back)")]
    assert loop.locks.current("churn") is None
    assert loop.hand_off("again").skipped == "nothing queued"


def test_a_queued_candidate_goes_stale_when_the_rollout_it_waited_behind_promotes(loop: Loop) -> None:
    _champion_and_challenger(loop)
    loop.locks.acquire("churn", RUNNING, 600)
    assert loop.register("1").outcome == "queued"  # v3, gated against champion v1
    loop.registry.move_alias("churn", "champion", "2", "staged rollout: promoted", RUNNING)
    loop.locks.release("churn", RUNNING)
    done = loop.hand_off("rollout of v2 ended (promoted)")
    assert (done.released, done.stale) == (None, "3")
    assert loop.registry.aliases("churn") == {"champion": "2"}, "nothing rolled out on a stale comparison"
    assert loop.status("3") == "stale"
    frm, to, reason = loop.queue_log()[-1]
    assert (frm, to) == ("3", None)
    assert "gated against champion v1, but the champion is now v2" in reason and "(promoted)" in reason
    assert loop.registry.version_tags("churn", "3")[reg.TAG_QUEUED_REASON] == reason


def test_a_candidate_gated_against_a_champion_replaced_before_registration_is_stale(loop: Loop) -> None:
    _champion_and_challenger(loop)
    loop.registry.move_alias("churn", "champion", "2", "promoted while v3 trained", "test")
    stale = loop.register("1")
    assert (stale.outcome, stale.alias, stale.version) == ("stale", None, "3")
    assert "gated against champion v1, but the champion is now v2" in (stale.reason or "")
    assert loop.registry.aliases("churn") == {"champion": "2"} and loop.status("3") == "stale"
    assert [(f, t) for f, t, _ in loop.queue_log()] == [(None, "3"), ("3", None)]


def test_an_expired_lock_holds_nothing_up(loop: Loop) -> None:
    _champion_and_challenger(loop)
    loop.locks.acquire("churn", RUNNING, 600)
    assert loop.register("1").outcome == "queued"  # v3
    loop.locks.release("churn", RUNNING)
    loop.locks.acquire("churn", "prefect-flow-run:crashed", 60, now=datetime.now(UTC) - timedelta(hours=1))
    fourth = loop.register("1")
    assert (fourth.outcome, fourth.version) == ("challenger", "4"), "a crashed rollout's lock does not queue"
    assert [e.holder for e in loop.locks.history("churn") if e.event == "expired"] == ["prefect-flow-run:crashed"]
    assert loop.status("3") == "superseded", "the older queued version is superseded by the newer challenger"
    assert loop.queue_log()[-1][2] == "superseded by v4, which became challenger directly (no rollout in flight)"


def test_a_paused_loop_queues_every_candidate_and_resuming_hands_off(loop: Loop) -> None:
    loop.loop.pause("churn", "user:ana", "label pipeline broken")
    first = loop.register(None)
    assert (first.outcome, first.alias) == ("queued", None), "not even a first champion moves while paused"
    assert first.reason == "queued: loop paused (by user:ana: label pipeline broken)"
    assert loop.registry.aliases("churn") == {}
    assert loop.hand_off("test").skipped.startswith("loop paused")
    loop.loop.resume("churn", "user:ana", "fixed")
    done = loop.hand_off("loop resumed by user:ana")
    assert (done.released, done.alias) == ("1", "champion")
    assert loop.registry.aliases("churn") == {"champion": "1"}

    loop.loop.pause("churn", "user:bob", "quarter-end freeze")
    assert loop.register("1").outcome == "queued"  # v2
    assert loop.registry.aliases("churn") == {"champion": "1"}
    loop.loop.resume("churn", "user:bob", "freeze over")
    assert loop.hand_off("loop resumed by user:bob").released == "2"
    assert loop.registry.aliases("churn") == {"champion": "1", "challenger": "2"}


def test_supersede_stops_the_running_rollout_and_puts_the_queued_version_in_place(loop: Loop) -> None:
    _champion_and_challenger(loop)
    with pytest.raises(QueueError, match="no rollout of 'churn' is in flight"):
        claim_supersede(loop.registry, loop.locks, loop.controls, "churn", None, "user:ana", "why")
    loop.locks.acquire("churn", RUNNING, 600)
    assert [loop.register("1").version for _ in range(2)] == ["3", "4"]
    with pytest.raises(QueueError, match="already the challenger"):
        claim_supersede(loop.registry, loop.locks, loop.controls, "churn", "2", "user:ana", "why")

    claim = claim_supersede(loop.registry, loop.locks, loop.controls, "churn", None, "user:ana", "v4 fixes a bug")
    assert (claim.version, claim.running_challenger, claim.stopped_holder) == ("4", "2", RUNNING)
    # the running rollout finds out at its next check (or its next lock renewal) and touches nothing
    with pytest.raises(RolloutSuperseded, match="in favour of v4: v4 fixes a bug"):
        loop.controls.check("churn", RUNNING)
    assert loop.locks.current("churn").holder == claim.holder and not loop.locks.release("churn", RUNNING)

    done = finish_supersede(loop.registry, loop.locks, claim, "user:ana", "v4 fixes a bug")
    assert (done.released, done.superseded) == ("4", ["3"])
    assert loop.registry.aliases("churn") == {"champion": "1", "challenger": "4"}
    assert (loop.status("2"), loop.status("3"), loop.status("4")) == ("superseded", "superseded", "challenger")
    moves = [(e.alias, e.from_version, e.to_version, e.actor) for e in loop.env["audit"].entries("churn")[-4:]]
    assert moves == [("challenger", "2", None, "user:ana"), ("queued", "4", None, "user:ana"),
                     ("challenger", None, "4", "user:ana"), ("queued", "3", None, "user:ana")]
    dropped = loop.env["audit"].entries("churn", "challenger")[-2]
    assert dropped.reason == "superseded by v4 (user:ana): v4 fixes a bug"
    assert dropped.evidence["stopped_rollout"] == RUNNING
    assert loop.locks.current("churn") is None, "the lock is free for v4's rollout"


def test_supersede_without_traffic_on_the_champion_moves_nothing_in(loop: Loop) -> None:
    """The service did not confirm routing everything to the champion: the running challenger is dropped (no
    challenger, no challenger traffic) but the queued version is not put under the stopped rollout's split."""
    _champion_and_challenger(loop)
    loop.locks.acquire("churn", RUNNING, 600)
    assert loop.register("1").outcome == "queued"  # v3
    claim = claim_supersede(loop.registry, loop.locks, loop.controls, "churn", None, "user:ana", "v3 instead")
    done = finish_supersede(loop.registry, loop.locks, claim, "user:ana", "v3 instead", traffic_on_champion=False)
    assert done.released is None and "stays queued" in (done.skipped or "")
    assert loop.registry.aliases("churn") == {"champion": "1"}
    assert (loop.status("2"), loop.status("3")) == ("superseded", "queued")
    assert loop.locks.current("churn") is None
    # nothing in flight now: the next hand-off (a resume, the next rollout's end) releases it
    assert loop.hand_off("supersede retried").released == "3"
