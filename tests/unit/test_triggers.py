"""The trigger rules, each deciding alone: dedupe, disabled, thresholds, pause, cooldown, explicit requests;
and the evaluators that turn numbers into signals (performance, volume, staleness, liveness)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from flywheel.trigger_policy import Liveness, PerformanceRule, StalenessRule, TriggerPolicy, VolumeRule
from flywheel.triggers import (
    Decision,
    History,
    Signal,
    alarm_for,
    decide,
    decision_id,
    drift_signal,
    liveness_alarms,
    performance_signal,
    pick_performance,
    request_signal,
    staleness_signal,
    volume_signal,
)

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
POLICY = TriggerPolicy()  # the defaults: cooldown 6h, every rule enabled


def drift(event_id: str = "window-1", model: str = "churn", alarm: bool = True) -> Signal:
    return drift_signal(alarm, model=model, event_id=event_id, occurred=T0, evidence={"share_drifted": 0.6})


def request(event_id: str = "req-1", model: str = "churn") -> Signal:
    return request_signal(model=model, reason="new labels reviewed", actor="user:ana", event_id=event_id,
                          occurred=T0)


def fired(model: str, at: datetime, event_id: str = "earlier", kind: str = "drift_detected") -> Decision:
    return Decision(id=decision_id(event_id, 0), at=at, model=model, kind=kind, event_id=event_id, outcome="fire",
                    reason="earlier retrain", occurred=at)


# ------------------------------------------------------------------------------------------- decide


def test_a_drift_alarm_with_no_history_fires() -> None:
    d = decide(drift(), History(), POLICY, paused=False, now=T0)
    assert d.outcome == "fire", d.reason
    assert d.id == decision_id("window-1", 0) and d.reason.startswith("drift_detected:")
    assert d.evidence == {"share_drifted": 0.6}


def test_a_rule_training_source_rides_on_its_fired_decision_and_event_only() -> None:
    from flywheel.trigger_policy import DriftRule, Rules
    from tasks.triggers import retrain_event

    served = TriggerPolicy(rules=Rules(drift_detected=DriftRule(training_source="served_features")))
    d = decide(drift(), History(), served, paused=False, now=T0)
    assert d.fired and d.evidence == {"share_drifted": 0.6, "training_source": "served_features"}
    assert retrain_event(d)["payload"]["training_source"] == "served_features"
    held = decide(drift(), History(decisions=(fired("churn", T0 - timedelta(hours=1)),)), served, False, T0)
    assert held.suppressed_by == "cooldown" and "training_source" not in held.evidence
    # no rule option: no key at all; the deployment trigger's template defaults it to null (the dataset's own)
    plain = decide(drift(), History(), POLICY, paused=False, now=T0)
    assert "training_source" not in retrain_event(plain)["payload"]
    asked = decide(request(), History(), served, paused=False, now=T0)
    assert "training_source" not in asked.evidence, "the drift rule's option is the drift rule's only"


def test_cooldown_suppresses_a_drift_signal_and_says_until_when() -> None:
    last = T0 - timedelta(hours=2)
    d = decide(drift(), History(decisions=(fired("churn", last),)), POLICY, paused=False, now=T0)
    assert (d.outcome, d.suppressed_by) == ("suppressed", "cooldown"), d.reason
    assert d.reason.startswith(f"cooldown until {(last + timedelta(hours=6)).isoformat()} "
                               f"(last retrain {last.isoformat()}"), d.reason


def test_cooldown_does_not_hold_an_explicit_request() -> None:
    history = History(decisions=(fired("churn", T0 - timedelta(minutes=5)),))
    d = decide(request(), history, POLICY, paused=False, now=T0)
    assert d.outcome == "fire", f"an explicit request must not wait for the cooldown: {d.reason}"


def test_cooldown_ends_after_its_duration() -> None:
    history = History(decisions=(fired("churn", T0 - timedelta(hours=6, seconds=1)),))
    assert decide(drift(), history, POLICY, paused=False, now=T0).outcome == "fire"


def test_cooldown_is_per_model() -> None:
    history = History(decisions=(fired("other_model", T0 - timedelta(minutes=5)),))
    assert decide(drift(), history, POLICY, paused=False, now=T0).outcome == "fire", \
        "a retrain of another model must not hold this one"


def test_cooldown_counts_a_retrain_the_decisions_do_not_show() -> None:
    history = History(last_retrain_at=T0 - timedelta(hours=1))  # e.g. `flywheel train` by hand
    d = decide(drift(), history, POLICY, paused=False, now=T0)
    assert d.suppressed_by == "cooldown", d.reason


def test_an_explicit_request_restarts_the_cooldown_for_automatic_signals() -> None:
    history = History(decisions=(fired("churn", T0 - timedelta(hours=1), "req-0", "retrain_requested"),))
    assert decide(drift(), history, POLICY, paused=False, now=T0).suppressed_by == "cooldown"


def test_zero_cooldown_switches_it_off() -> None:
    policy = TriggerPolicy.model_validate({"discipline": {"cooldown": 0}})
    history = History(decisions=(fired("churn", T0 - timedelta(seconds=1)),))
    assert decide(drift(), history, policy, paused=False, now=T0).outcome == "fire"


def test_dedupe_catches_a_repeated_event_id_even_for_explicit_requests() -> None:
    first = decide(request("req-9"), History(), POLICY, paused=False, now=T0)
    again = decide(request("req-9"), History(decisions=(first,)), POLICY, paused=False, now=T0 + timedelta(days=2))
    assert first.outcome == "fire"
    assert (again.outcome, again.suppressed_by) == ("suppressed", "duplicate")
    assert again.reason.startswith(f"duplicate of {first.id}"), again.reason
    assert again.id == decision_id("req-9", 1) != first.id, "each decision of one event id has its own id"


def test_a_repeat_of_a_suppressed_signal_is_a_duplicate_of_that_decision() -> None:
    held = decide(drift("w-7"), History(decisions=(fired("churn", T0 - timedelta(hours=1)),)), POLICY, False, T0)
    again = decide(drift("w-7"), History(decisions=(held,)), POLICY, False, T0 + timedelta(hours=8))
    assert held.suppressed_by == "cooldown" and again.suppressed_by == "duplicate", again.reason
    assert held.id in again.reason


def test_an_unmet_check_does_not_count_for_dedupe() -> None:
    quiet = decide(drift("w-3", alarm=False), History(), POLICY, False, T0)
    later = decide(drift("w-3", alarm=True), History(decisions=(quiet,)), POLICY, False, T0 + timedelta(hours=1))
    assert quiet.suppressed_by == "below_threshold" and later.outcome == "fire", later.reason


def test_paused_suppresses_every_automatic_signal_and_says_so() -> None:
    pause = "loop paused by user:ana at 2026-03-01T10:00:00+00:00: incident 42"
    signals = [drift(), volume_signal(9000, VolumeRule(), model="churn", occurred=T0, since=None),
               staleness_signal(T0 - timedelta(days=40), T0, StalenessRule(), model="churn", version="3")]
    for signal in signals:
        d = decide(signal, History(), POLICY, paused=pause, now=T0)
        assert (d.outcome, d.suppressed_by) == ("suppressed", "paused"), f"{signal.kind}: {d.reason}"
        assert d.reason == f"loop paused ({pause})"
    assert decide(drift(), History(), POLICY, paused=True, now=T0).reason == "loop paused"


def test_paused_does_not_hold_an_explicit_request() -> None:
    assert decide(request(), History(), POLICY, paused=True, now=T0).outcome == "fire"


def test_a_disabled_rule_suppresses_naming_it() -> None:
    policy = TriggerPolicy.model_validate({"rules": {"drift_detected": {"enabled": False}}})
    d = decide(drift(), History(), policy, paused=False, now=T0)
    assert d.suppressed_by == "disabled" and "drift_detected is disabled" in d.reason


def test_disabled_explicit_requests_are_refused_too() -> None:
    policy = TriggerPolicy.model_validate({"rules": {"retrain_requested": {"enabled": False}}})
    assert decide(request(), History(), policy, paused=False, now=T0).suppressed_by == "disabled"


def test_below_threshold_does_not_fire_and_is_recorded_with_the_figures() -> None:
    d = decide(drift(alarm=False), History(), POLICY, paused=False, now=T0)
    assert (d.outcome, d.suppressed_by) == ("suppressed", "below_threshold")
    assert d.reason == "below threshold: no drift alarm"


def test_dedupe_is_checked_before_the_pause_and_the_cooldown() -> None:
    first = decide(drift("w-1"), History(), POLICY, False, T0)
    d = decide(drift("w-1"), History(decisions=(first,)), POLICY, paused=True, now=T0 + timedelta(minutes=1))
    assert d.suppressed_by == "duplicate"


def test_now_must_be_timezone_aware() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        decide(drift(), History(), POLICY, False, datetime(2026, 3, 1))


# ---------------------------------------------------------------------------------------- evaluators


class _Perf:
    """flywheel.monitoring.performance.Performance's shape: realized figures, floats."""

    def __init__(self, roc_auc: float, n: int, accuracy: float = 0.8) -> None:
        self.roc_auc, self.accuracy, self.n = roc_auc, accuracy, n


def test_performance_realized_below_the_floor_fires() -> None:
    s = performance_signal(_Perf(0.62, 800), PerformanceRule(), model="churn", event_id="perf-1", occurred=T0)
    assert s.verdict == "met", s.detail
    assert "realized roc_auc 0.620 on 800 labelled rows < floor 0.700" in s.detail
    assert decide(s, History(), POLICY, False, T0).outcome == "fire"


def test_performance_above_the_floor_and_within_the_drop_is_below_threshold() -> None:
    s = performance_signal(_Perf(0.83, 800), PerformanceRule(), model="churn", event_id="perf-2", occurred=T0,
                           reference=0.85)
    assert s.verdict == "below_threshold", s.detail
    assert decide(s, History(), POLICY, False, T0).reason.startswith("below threshold: realized roc_auc 0.830")


def test_performance_drop_against_the_reference_fires() -> None:
    s = performance_signal(_Perf(0.78, 800), PerformanceRule(), model="churn", event_id="perf-3", occurred=T0,
                           reference=0.85)
    assert s.verdict == "met" and "0.070 below the reference 0.850 (max drop 0.050)" in s.detail, s.detail


def test_performance_on_too_few_labelled_rows_is_not_judged() -> None:
    s = performance_signal(_Perf(0.40, 120), PerformanceRule(), model="churn", event_id="perf-4", occurred=T0)
    d = decide(s, History(), POLICY, False, T0)
    assert (s.verdict, d.suppressed_by) == ("too_few_rows", "too_few_rows")
    assert d.reason.startswith("too few rows: realized roc_auc 0.400 on 120 labelled rows (fewer than 500")


def test_performance_estimated_when_no_outcomes_yet() -> None:
    from flywheel.monitoring.performance import estimate_performance

    rng = np.random.default_rng(0)
    p = np.clip(rng.beta(1.2, 1.2, 2000), 0.001, 0.999)  # well spread probabilities: an estimated AUC near 0.8
    estimate = estimate_performance(p, n_boot=50, confidence=0.9, seed=1)
    rule = PerformanceRule(min_value=0.95)
    chosen = pick_performance(_Perf(0.5, 10), estimate, rule)  # 10 labelled rows: too few, the estimate is used
    assert chosen is estimate
    s = performance_signal(chosen, rule, model="churn", event_id="perf-5", occurred=T0)
    assert s.verdict == "met" and s.evidence["source"] == "estimated", s.detail
    assert s.evidence["interval"][0] <= s.evidence["value"] <= s.evidence["interval"][1]
    upper = performance_signal(chosen, rule.model_copy(update={"estimate_basis": "upper", "min_value": 0.5}),
                               model="churn", event_id="perf-6", occurred=T0)
    assert upper.verdict == "below_threshold", "the upper end of the interval is above 0.5"


def test_realized_is_preferred_once_enough_outcomes_arrived() -> None:
    realized = _Perf(0.8, 600)
    assert pick_performance(realized, object(), PerformanceRule()) is realized  # type: ignore[arg-type]
    no_estimates = PerformanceRule(use_estimate=False)
    assert pick_performance(_Perf(0.8, 10), object(), no_estimates).n == 10  # type: ignore[arg-type,union-attr]


def test_volume_fires_at_n_new_labelled_rows_and_not_one_below() -> None:
    rule = VolumeRule(min_new_labelled_rows=5000)
    since = T0 - timedelta(days=3)
    below = volume_signal(4999, rule, model="churn", occurred=T0, since=since)
    at = volume_signal(5000, rule, model="churn", occurred=T0, since=since)
    assert below.verdict == "too_few_rows" and "4999 new labelled rows since" in below.detail
    assert decide(below, History(), POLICY, False, T0).reason.startswith("too few rows: 4999 new labelled rows")
    assert at.verdict == "met" and decide(at, History(), POLICY, False, T0).outcome == "fire"
    assert at.event_id == below.event_id == f"volume_reached:churn:{since.isoformat()}:x1", \
        "one event id per training: the volume fires once until the next training"


def test_staleness_fires_after_the_max_age_once_per_period() -> None:
    rule = StalenessRule(max_age=timedelta(days=30))
    registered = T0 - timedelta(days=29)
    young = staleness_signal(registered, T0, rule, model="churn", version="3")
    stale = staleness_signal(registered, T0 + timedelta(days=2), rule, model="churn", version="3")
    assert young.verdict == "below_threshold" and "29.0 days old (< max age 30d)" in young.detail
    assert stale.verdict == "met" and "31.0 days old (>= max age 30d)" in stale.detail
    first = decide(stale, History(), POLICY, False, T0 + timedelta(days=2))
    assert first.outcome == "fire"
    hour_later = staleness_signal(registered, T0 + timedelta(days=2, hours=7), rule, model="churn", version="3")
    assert decide(hour_later, History(decisions=(first,)), POLICY, False, hour_later.occurred).suppressed_by == \
        "duplicate", "still the same stale period: no second retrain"
    next_period = staleness_signal(registered, T0 + timedelta(days=32), rule, model="churn", version="3")
    assert next_period.event_id != stale.event_id
    assert decide(next_period, History(decisions=(first,)), POLICY, False, next_period.occurred).outcome == "fire"


def test_liveness_silent_monitoring_and_outcomes_are_alarms() -> None:
    policy = Liveness(monitoring_max_silence=timedelta(hours=3), outcomes_max_silence=timedelta(days=2))
    assert liveness_alarms(T0 - timedelta(hours=1), T0 - timedelta(days=1), T0, policy, model="churn") == []
    alarms = liveness_alarms(T0 - timedelta(hours=4), T0 - timedelta(days=3), T0, policy, model="churn")
    assert [a.evidence["silent"] for a in alarms] == ["monitoring", "outcomes"]
    assert all(a.kind == "liveness" and a.severity == "critical" for a in alarms)
    assert "no judged monitoring window for 4.0 hours" in alarms[0].summary, alarms[0].summary
    again = liveness_alarms(T0 - timedelta(hours=4), T0 - timedelta(days=3), T0 + timedelta(hours=1), policy,
                            model="churn")
    assert [a.id for a in again] == [a.id for a in alarms], "the same silence keeps its alarm id (sent once)"


def test_liveness_never_recorded_counts_from_watched_since() -> None:
    policy = Liveness()
    assert liveness_alarms(None, None, T0, policy, model="churn", watched_since=T0 - timedelta(hours=1)) == []
    late = liveness_alarms(None, None, T0, policy, model="churn", watched_since=T0 - timedelta(days=3))
    assert len(late) == 2 and "recorded since" in late[0].summary
    never = liveness_alarms(None, None, T0, policy, model="churn")
    assert len(never) == 2 and "recorded ever" in never[0].summary


def test_met_drift_and_performance_signals_raise_alarms_for_people() -> None:
    alarm = alarm_for(drift(), report_url="file:///reports/w1.html")
    assert alarm is not None and alarm.kind == "drift" and alarm.report_url == "file:///reports/w1.html"
    assert alarm_for(drift(alarm=False)) is None
    assert alarm_for(request()) is None
