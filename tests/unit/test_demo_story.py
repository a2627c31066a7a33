"""The demo's story check: the good story passes; each broken step alone fails with one line naming it.

The CLI-level part: the verdict the `demo` command ends with exits 1 naming the step when the story is
broken, and returns (exit 0) when it holds; the e2e test (tests/e2e/test_demo.py) runs the whole demo.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
import typer

from flywheel.demo_story import (
    ClockSeen,
    DecisionSeen,
    DemoStory,
    LifecycleSeen,
    RealizedSeen,
    RetrainSeen,
    RolloutSeen,
    RolloutSkipped,
    Skipped,
    TrainingSeen,
    WebhookSeen,
    WindowSeen,
    check_story,
    skipped_checks,
)

FIRST = TrainingSeen(version="1", outcome="champion", state="Completed", aliases_before={},
                     aliases_after={"champion": "1"})
SECOND = TrainingSeen(version="2", outcome="challenger", state="Completed", aliases_before={"champion": "1"},
                      aliases_after={"champion": "1", "challenger": "2"})
PROMOTED = RolloutSeen(state="Promoted", detail="promoted: every step passed", aliases_after={"champion": "2"})
SABOTAGED = TrainingSeen(version="3", outcome="rejected", state="Rejected",
                         failed_rules=("primary", "vs_champion", "baseline"),
                         aliases_before={"champion": "2"}, aliases_after={"champion": "2"})
GOOD = DemoStory(first=FIRST, second=SECOND, rollout=PROMOTED, sabotaged=SABOTAGED)


def _only(story: DemoStory) -> str:
    failures = check_story(story)
    assert len(failures) == 1, failures
    return failures[0]


def test_the_story_as_told_passes() -> None:
    assert check_story(GOOD) == []
    assert skipped_checks(GOOD) == []


# ------------------------------------------------------------------------------------------ step 1


def test_no_champion_when_the_first_model_is_rejected_names_the_rules() -> None:
    first = replace(FIRST, outcome="rejected", state="Rejected", failed_rules=("latency",), aliases_after={})
    assert _only(replace(GOOD, first=first)) == "step 1: no champion: v1 rejected on latency"


def test_a_first_model_that_meets_an_existing_champion_is_named() -> None:
    first = replace(FIRST, version="4", outcome="challenger", aliases_before={"champion": "2"},
                    aliases_after={"champion": "2", "challenger": "4"})
    line = _only(replace(GOOD, first=first))
    assert line.startswith("step 1: no new champion: v4 became challenger of champion v2"), line
    assert "fresh home" in line


def test_a_champion_outcome_without_the_alias_fails() -> None:
    line = _only(replace(GOOD, first=replace(FIRST, aliases_after={})))
    assert line == "step 1: v1 was registered as champion, but the champion alias is unset"


# ------------------------------------------------------------------------------------------ step 2


def test_no_challenger_when_the_second_model_is_rejected() -> None:
    second = replace(SECOND, outcome="rejected", state="Rejected", failed_rules=("vs_champion", "latency"),
                     aliases_after={"champion": "1"})
    line = _only(replace(GOOD, second=second, rollout=None))
    assert line == "step 2: no challenger: v2 rejected on vs_champion, latency"


def test_a_second_model_that_becomes_champion_directly_fails() -> None:
    second = replace(SECOND, outcome="champion", aliases_before={}, aliases_after={"champion": "2"})
    line = _only(replace(GOOD, second=second, rollout=None))
    assert line.startswith("step 2: v2 became champion directly, not challenger"), line


def test_a_challenger_outcome_without_the_alias_fails() -> None:
    line = _only(replace(GOOD, second=replace(SECOND, aliases_after={"champion": "1"})))
    assert line == "step 2: v2 was registered as challenger, but the challenger alias is unset"


def test_a_challenger_already_promoted_when_training_returned_is_fine() -> None:
    assert check_story(replace(GOOD, second=replace(SECOND, aliases_after={"champion": "2"}))) == []


def test_a_rolled_back_challenger_names_the_final_state_and_its_reason() -> None:
    rollout = RolloutSeen(state="RolledBack", detail="rolled_back: canary 20%: guard breach p99_latency_ms=412.0 "
                          "(threshold 250.0)", aliases_after={"champion": "1"})
    line = _only(replace(GOOD, rollout=rollout))
    assert line == ("step 2: challenger v2 was not promoted: rollout ended RolledBack (rolled_back: canary 20%: "
                    "guard breach p99_latency_ms=412.0 (threshold 250.0))")


def test_a_rollout_not_seen_to_end_says_why() -> None:
    rollout = RolloutSeen(state=None, detail="rollout run brave-owl still Running after 300 s",
                          aliases_after={"champion": "1", "challenger": "2"})
    line = _only(replace(GOOD, rollout=rollout))
    assert line == "step 2: challenger v2 was not promoted: rollout run brave-owl still Running after 300 s"


def test_promoted_state_without_the_champion_alias_moved_fails() -> None:
    line = _only(replace(GOOD, rollout=replace(PROMOTED, aliases_after={"champion": "1"})))
    assert line == "step 2: the rollout ended Promoted, but the champion alias is v1, not v2"


def test_a_challenger_without_any_rollout_observation_fails() -> None:
    line = _only(replace(GOOD, rollout=None))
    assert line == "step 2: challenger v2 was registered but no rollout of it was observed"


def test_a_skipped_rollout_is_stated_not_failed() -> None:
    story = replace(GOOD, rollout=RolloutSkipped("no stack running"),
                    sabotaged=replace(SABOTAGED, aliases_before=SECOND.aliases_after,
                                      aliases_after=SECOND.aliases_after))
    assert check_story(story) == []
    assert skipped_checks(story) == ["step 2: rollout of challenger v2 skipped: no stack running"]


# ------------------------------------------------------------------------------------------ step 3


def test_a_sabotaged_model_that_passes_fails() -> None:
    sabotaged = replace(SABOTAGED, outcome="challenger", state="Completed", failed_rules=(),
                        aliases_after={"champion": "2", "challenger": "3"})
    failures = check_story(replace(GOOD, sabotaged=sabotaged))
    assert failures == ["step 3: the sabotaged v3 was not rejected: it became challenger",
                        "step 3: aliases moved while the sabotaged v3 was registered: challenger unset -> v3"]


def test_a_rejection_whose_run_did_not_end_rejected_fails() -> None:
    line = _only(replace(GOOD, sabotaged=replace(SABOTAGED, state="Completed")))
    assert line == "step 3: the sabotaged v3 was rejected, but its run ended Completed, not Rejected"


def test_an_alias_moved_during_the_rejection_fails() -> None:
    line = _only(replace(GOOD, sabotaged=replace(SABOTAGED, aliases_after={"champion": "1"})))
    assert line == "step 3: aliases moved while the sabotaged v3 was registered: champion v2 -> v1"


# ------------------------------------------------------------------------------------------ all at once


def test_every_candidate_rejected_on_latency_names_steps_one_and_two() -> None:
    """The slow-machine run that used to exit 0: no champion, no challenger, no rollout."""
    story = DemoStory(
        first=replace(FIRST, outcome="rejected", state="Rejected", failed_rules=("latency",), aliases_after={}),
        second=replace(SECOND, outcome="rejected", state="Rejected", failed_rules=("latency",), aliases_before={},
                       aliases_after={}),
        rollout=None,
        sabotaged=replace(SABOTAGED, aliases_before={}, aliases_after={}),
    )
    assert check_story(story) == ["step 1: no champion: v1 rejected on latency",
                                  "step 2: no challenger: v2 rejected on latency"]


# ------------------------------------------------------------------------------------------ the CLI verdict


def test_the_demo_command_exits_1_naming_the_broken_step(capsys: pytest.CaptureFixture[str]) -> None:
    from flywheel.cli import demo_verdict

    rolled_back = RolloutSeen(state="RolledBack", detail="rolled_back: guard breach", aliases_after={"champion": "1"})
    with pytest.raises(typer.Exit) as exited:
        demo_verdict(replace(GOOD, rollout=rolled_back))
    assert exited.value.exit_code == 1
    err = " ".join(capsys.readouterr().err.split())
    assert "FAILED step 2: challenger v2 was not promoted: rollout ended RolledBack" in err, err


def test_the_demo_command_returns_when_the_story_holds(capsys: pytest.CaptureFixture[str]) -> None:
    from flywheel.cli import demo_verdict

    demo_verdict(GOOD)  # no typer.Exit: the command ends with code 0
    err = " ".join(capsys.readouterr().err.split())
    assert "story checked: champion v1, challenger v2 promoted by the canary rollout, sabotaged v3 rejected" in err
    assert "FAILED" not in err


# ------------------------------------------------------------------------------------------ step 4: the lifecycle

WINDOWS = (WindowSeen(rows=600, status="drift", alarm=False, decisions=("drift_detected: suppressed (no alarm)",)),
           WindowSeen(rows=600, status="drift", alarm=True, decisions=("drift_detected: fire (drift alarm)",)),
           WindowSeen(rows=600, status="drift", alarm=True, decisions=("drift_detected: suppressed (cooldown)",)))
NO_ALARM = DecisionSeen(id="d0", outcome="suppressed", suppressed_by="below_threshold", reason="no drift alarm")
FIRED = DecisionSeen(id="d1", outcome="fire", suppressed_by=None, reason="drift alarm", flow_run_id="r1")
COOLED = DecisionSeen(id="d2", outcome="suppressed", suppressed_by="cooldown", reason="cooldown until 14:00")
RETRAIN = RetrainSeen(run_id="r1", state="Completed", version="4", outcome="challenger",
                      training_source="served_features", training_rows=4200)
REALIZED = tuple(RealizedSeen(window=n, scored_rows=600, labelled_rows=600, min_labelled_rows=500,
                              realized_roc_auc=0.80, estimated_roc_auc=0.82, roc_auc_error=0.02) for n in (1, 2, 3))
LIFECYCLE = LifecycleSeen(windows=WINDOWS, drift_decisions=(NO_ALARM, FIRED, COOLED), retrain=RETRAIN,
                          rollout=PROMOTED, webhook=WebhookSeen(status_code=202, runs_created=1), realized=REALIZED)


def _only4(seen: LifecycleSeen) -> str:
    return _only(replace(GOOD, lifecycle=seen))


def test_the_lifecycle_as_told_passes() -> None:
    assert check_story(replace(GOOD, lifecycle=LIFECYCLE)) == []
    assert skipped_checks(replace(GOOD, lifecycle=LIFECYCLE)) == []


def test_a_rejected_retrain_and_a_rolled_back_one_are_valid_outcomes() -> None:
    rejected = replace(RETRAIN, state="Rejected", outcome="rejected")
    assert check_story(replace(GOOD, lifecycle=replace(LIFECYCLE, retrain=rejected, rollout=None))) == []
    rolled_back = RolloutSeen(state="RolledBack", detail="guard breach", aliases_after={"champion": "2"})
    assert check_story(replace(GOOD, lifecycle=replace(LIFECYCLE, rollout=rolled_back))) == []


def test_late_labels_that_filled_in_no_realized_metric_fail() -> None:
    short = tuple(replace(r, labelled_rows=120, realized_roc_auc=None) for r in REALIZED)
    line = _only4(replace(LIFECYCLE, realized=short))
    assert line.startswith("step 4: the late labels filled in no realized metric beside the estimate (window 1: "
                           "120 of 600 rows labelled (realized from 500)"), line
    assert _only4(replace(LIFECYCLE, realized=())).endswith("(no drifted window was evaluated)")


def test_one_window_realized_is_enough() -> None:
    some = (REALIZED[0], *(replace(r, labelled_rows=0, realized_roc_auc=None) for r in REALIZED[1:]))
    assert check_story(replace(GOOD, lifecycle=replace(LIFECYCLE, realized=some))) == []


def test_labels_that_could_not_land_fail_naming_why() -> None:
    line = _only4(replace(LIFECYCLE, realized=Skipped("the outcome batch was quarantined: ...")))
    assert line == "step 4: no realized metric beside the estimate: the outcome batch was quarantined: ..."


def test_no_drift_alarm_in_any_window_fails() -> None:
    quiet = tuple(replace(w, alarm=False) for w in WINDOWS)
    line = _only4(replace(LIFECYCLE, windows=quiet))
    assert line.startswith("step 4: no drift alarm raised in 3 monitoring windows"), line


def test_an_alarm_on_the_first_window_ignores_persistence() -> None:
    early = (replace(WINDOWS[0], alarm=True), *WINDOWS[1:])
    line = _only4(replace(LIFECYCLE, windows=early))
    assert line.startswith("step 4: the drift alarm was raised on the first window, before the persistence"), line


def test_no_fired_drift_decision_fails() -> None:
    line = _only4(replace(LIFECYCLE, drift_decisions=(NO_ALARM, COOLED), retrain=None, rollout=None))
    assert line.startswith("step 4: expected exactly one fired drift decision, got 0"), line


def test_two_fired_drift_decisions_fail() -> None:
    line = _only4(replace(LIFECYCLE, drift_decisions=(FIRED, replace(FIRED, id="d3"), COOLED)))
    assert line.startswith("step 4: expected exactly one fired drift decision, got 2"), line


def test_no_decision_suppressed_by_the_cooldown_fails() -> None:
    line = _only4(replace(LIFECYCLE, drift_decisions=(NO_ALARM, FIRED)))
    assert line.startswith("step 4: no drift decision was suppressed by the cooldown"), line


def test_a_fired_decision_that_started_no_training_run_fails() -> None:
    line = _only4(replace(LIFECYCLE, retrain=RetrainSeen(None, None, None, None, "no run within 90 s"), rollout=None))
    assert line == "step 4: the fired drift decision started no training run (no run within 90 s)"


def test_a_retrain_not_seen_to_end_fails() -> None:
    line = _only4(replace(LIFECYCLE, retrain=RetrainSeen("r1", None, None, None, "still Running"), rollout=None))
    assert line == "step 4: the training run the trigger started was not seen to end (still Running)"


def test_a_retrain_not_gated_fails() -> None:
    failed = RetrainSeen("r1", "Failed", None, "failed", "boom")
    line = _only4(replace(LIFECYCLE, retrain=failed, rollout=None))
    assert line.startswith("step 4: the retrained candidate was not gated to challenger or rejected: run ended "
                           "Failed"), line


def test_a_drift_retrain_on_the_offline_store_fails() -> None:
    offline = replace(RETRAIN, training_source="offline_store", training_rows=30000)
    line = _only4(replace(LIFECYCLE, retrain=offline))
    assert line == ("step 4: the drift retrain v4 trained on offline_store (30000 rows), not on the served "
                    "features joined with their outcomes")
    rejected = replace(RETRAIN, state="Rejected", outcome="rejected", training_source=None, training_rows=None)
    assert _only4(replace(LIFECYCLE, retrain=rejected, rollout=None)) == (
        "step 4: the drift retrain v4 trained on an unknown source, not on the served features joined with their "
        "outcomes")


def test_a_retrained_challenger_without_a_rollout_fails() -> None:
    line = _only4(replace(LIFECYCLE, rollout=None))
    assert line == "step 4: challenger v4 was registered but no rollout of it was observed"


def test_a_retrained_challenger_whose_rollout_made_no_decision_fails() -> None:
    held = RolloutSeen(state=None, detail="rollout run calm-fox still Running after 600 s")
    line = _only4(replace(LIFECYCLE, rollout=held))
    assert line == ("step 4: no rollout decision on challenger v4: rollout not seen to end (rollout run calm-fox "
                    "still Running after 600 s)")


def test_a_webhook_retrain_that_created_no_run_fails() -> None:
    line = _only4(replace(LIFECYCLE, webhook=WebhookSeen(status_code=202, runs_created=0)))
    assert line == "step 4: the signed webhook retrain created 0 training runs, not 1"


def test_a_refused_webhook_fails() -> None:
    line = _only4(replace(LIFECYCLE, webhook=WebhookSeen(status_code=401, runs_created=0, detail="bad signature")))
    assert line == "step 4: the signed webhook retrain was not accepted: HTTP 401 (bad signature)"


def test_a_skipped_webhook_or_lifecycle_is_stated_not_failed() -> None:
    story = replace(GOOD, lifecycle=replace(LIFECYCLE, webhook=Skipped("the webhook receiver is not running")))
    assert check_story(story) == []
    assert skipped_checks(story) == ["step 4: the signed webhook retrain skipped: the webhook receiver is not running"]
    story = replace(GOOD, lifecycle=Skipped("no stack running"))
    assert check_story(story) == []
    assert skipped_checks(story) == ["step 4: the lifecycle (drift -> monitoring -> trigger -> retrain -> rollout) "
                                     "skipped: no stack running"]


# ------------------------------------------------------------------------------------------ the simulated clock

T0 = datetime(2026, 12, 2, 10, 0, tzinfo=UTC)
SPEED = 144.0  # `make demo`: a day per 600 s
# (simulated, wall) samples the demo took, one per timeline row: 4 min of wall time, 9.6 simulated hours
SAMPLES = tuple((T0 + timedelta(seconds=SPEED * s), T0 + timedelta(seconds=s)) for s in range(0, 241, 20))
SIMULATED = ClockSeen(simulated=True, speed=SPEED, samples=SAMPLES)
# the drift decisions at simulated times inside the demo's: the fire at +4 h, the suppression 1.5 h later
AT_FIRE, AT_COOL = T0 + timedelta(hours=4), T0 + timedelta(hours=5, minutes=30)
TIMED = replace(LIFECYCLE, cooldown=timedelta(hours=6), drift_decisions=(
    replace(NO_ALARM, at=T0 + timedelta(hours=3)), replace(FIRED, at=AT_FIRE), replace(COOLED, at=AT_COOL)))
ON_SIMULATED = replace(GOOD, lifecycle=TIMED, clock=SIMULATED)


def test_the_story_on_a_simulated_clock_passes_and_its_line_states_the_cooldown_in_simulated_hours() -> None:
    from flows.demo import _lifecycle_line

    assert check_story(ON_SIMULATED) == []
    assert "1 suppressed by the cooldown (1.5 simulated h after the fire, inside the 6 h cooldown)" \
        in _lifecycle_line(TIMED)


def test_a_simulated_clock_that_did_not_advance_fails() -> None:
    stuck = replace(SIMULATED, samples=tuple((T0, wall) for _, wall in SAMPLES))
    line = _only(replace(GOOD, clock=stuck))
    assert line.startswith("clock: the simulated time did not advance from one timeline row to the next"), line
    backwards = replace(SIMULATED, samples=(SAMPLES[1], SAMPLES[0], *SAMPLES[2:]))
    assert _only(replace(GOOD, clock=backwards)).startswith("clock: the simulated time did not advance")


def test_a_simulated_clock_off_its_speed_fails() -> None:
    slow = replace(SIMULATED, samples=tuple((T0 + (sim - T0) / 2, wall) for sim, wall in SAMPLES))
    assert _only(replace(GOOD, clock=slow)) == "clock: simulated time ran at x72 of wall time, not at its " \
                                                       "speed x144"


def test_a_drift_decision_taken_outside_the_simulated_time_fails() -> None:
    # a process on the wall clock: its decision dated before the simulated time the demo saw at its start
    on_wall = (replace(NO_ALARM, at=T0 - timedelta(minutes=2)), *TIMED.drift_decisions[1:])
    line = _only(replace(ON_SIMULATED, lifecycle=replace(TIMED, drift_decisions=on_wall)))
    assert line.startswith("step 4: drift decision d0 (suppressed) was taken at 2026-12-02 09:58:00, outside the "
                           "demo's simulated time 2026-12-02 10:00:00 - 2026-12-02 19:36:00"), line


def test_a_cooldown_suppression_beyond_the_cooldown_in_simulated_time_fails() -> None:
    early_fire = T0 + timedelta(hours=2)
    late = (TIMED.drift_decisions[0], replace(FIRED, at=early_fire),
            replace(COOLED, at=early_fire + timedelta(hours=7)))
    line = _only(replace(ON_SIMULATED, lifecycle=replace(TIMED, drift_decisions=late)))
    assert line == "step 4: the cooldown suppression d2 came 7.0 h after the fire, not within the cooldown (6.0 h) " \
                   "in simulated time"


def test_the_wall_clock_story_has_no_clock_checks() -> None:
    wall = ClockSeen(simulated=False, speed=1.0, samples=tuple((w, w) for _, w in SAMPLES))
    assert check_story(replace(ON_SIMULATED, clock=wall)) == []
