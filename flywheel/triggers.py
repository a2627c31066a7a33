"""When the loop retrains on its own: the project's decision, which Prefect only carries out.

Something happens (a drift alarm, a performance figure, new labels, a champion's age, a person asking):
an evaluator turns the numbers into a `Signal`; `decide` judges the signal against the policy
(configs/triggers.yaml), the decisions recorded so far and whether the loop is paused, and returns a
`Decision`: `fire`, or `suppressed` with the reason. Only a fired decision emits the event the training
deployment's trigger runs on (tasks/triggers.py); every decision, fired or not, is recorded.

The rules, in the order `decide` applies them:

1. dedupe: a signal whose event id was already decided is a `duplicate of <decision id>` (a decision that
   found the condition unmet, or the rule disabled, does not count: the same check may come true later);
2. the rule is disabled in the policy;
3. the condition is not met: `below threshold` or `too few rows`, with the figures;
4. the loop is paused (`flywheel loop pause`): every automatic signal is suppressed, and recorded;
5. cooldown: no automatic retrain of a model within `discipline.cooldown` of its last retrain, `cooldown
   until <t> (last retrain <t>)`.

Explicit requests (`retrain_requested`, e.g. `flywheel retrain`) are held only by dedupe and by the
training deployment's concurrency limit, never by the cooldown or a pause: a person asked.

The policy itself (schedules, rules, thresholds, cooldown, liveness) is flywheel/trigger_policy.py.

Decision ids are deterministic (uuid5 of the signal's event id and how many decisions that event id had
before), so two processes deciding the same signal at once compute the same id and the database's primary
key lets only one of them record it; the loser decides again and finds a duplicate. The id of a fired
decision is the id of the event it emits, so a re-emitted event is dropped by Prefect's own dedupe.

Pure: no Prefect, MLflow, database or clock inside; `now` is passed in (flywheel/clock.py).
"""

from __future__ import annotations

import math
import uuid
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from flywheel.trigger_policy import (
    Liveness,
    PerformanceRule,
    StalenessRule,
    TriggerPolicy,
    VolumeRule,
    describe_duration,
    iso_seconds,
)

if TYPE_CHECKING:
    from flywheel.monitoring.performance import Estimate, Performance

SignalKind = Literal["drift_detected", "performance_degraded", "volume_reached", "model_stale", "retrain_requested"]
EXPLICIT: frozenset[str] = frozenset({"retrain_requested"})  # asked for by a person or a system: no cooldown
Verdict = Literal["met", "below_threshold", "too_few_rows"]
Outcome = Literal["fire", "suppressed"]
SuppressedBy = Literal["duplicate", "disabled", "below_threshold", "too_few_rows", "paused", "cooldown"]
# decisions that observed nothing (condition unmet, rule off): the same event id may be decided again
NOT_OBSERVED: frozenset[str] = frozenset({"disabled", "below_threshold", "too_few_rows"})
RETRAIN_EVENT = "flywheel.retrain.requested"  # what the training deployment's trigger runs on
TRAINING_SOURCE = "training_source"  # a fired decision's evidence key and its event's payload key (rule option)
NAMESPACE = uuid.UUID("0f3a8f52-1c3e-4d8e-b0a9-7f1d2c4b6e90")


# ------------------------------------------------------------------------------------------ alarms

ALARM_NAMESPACE = uuid.UUID("5b0c5f8e-7a52-4d0e-9a0b-3f1e6c2d8a41")
AlarmKind = Literal["drift", "data_quality", "performance", "liveness", "trigger"]
Severity = Literal["warning", "critical"]


class Alarm(BaseModel):
    """Something a person should know about, with the evidence and a link to its report."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str  # stable for one observation: the same silence, the same window, the same decision
    kind: AlarmKind
    model: str
    summary: str  # one line
    occurred: AwareDatetime  # on the project's clock
    severity: Severity = "warning"
    evidence: dict[str, Any] = {}
    report_url: str | None = None  # the report a person opens (Evidently HTML, Prefect artifact, run page)


def alarm_id(*parts: object) -> str:
    """A deterministic alarm id from what identifies the observation."""
    return str(uuid.uuid5(ALARM_NAMESPACE, ":".join(str(p) for p in parts)))



# ------------------------------------------------------------------------------------ signals, decisions


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)



class Signal(_Strict):
    """Something happened to a model: what, which event, the evidence, and whether the rule's condition is met."""

    kind: SignalKind
    model: str = Field(min_length=1, max_length=256)
    event_id: str = Field(min_length=1, max_length=256)
    occurred: AwareDatetime
    evidence: dict[str, Any] = {}
    verdict: Verdict = "met"
    detail: str = ""  # one line: the figures behind the verdict

    @property
    def automatic(self) -> bool:
        return self.kind not in EXPLICIT


class Decision(_Strict):
    """What was decided about one signal, and why. `id` is also the id of the event a fired decision emits."""

    id: str
    at: AwareDatetime  # on the project's clock
    model: str
    kind: SignalKind
    event_id: str
    outcome: Outcome
    reason: str
    suppressed_by: SuppressedBy | None = None
    evidence: dict[str, Any] = {}
    occurred: AwareDatetime  # when the signal happened
    emitted_at: AwareDatetime | None = None  # wall time its retrain event went out (fired decisions only)
    flow_run_id: str | None = None  # the training run it started, once known

    @property
    def fired(self) -> bool:
        return self.outcome == "fire"


class History(_Strict):
    """What `decide` needs to know of the past: decisions recorded so far (at least every earlier decision
    of the signal's model and of its event id) and the last retrain the decisions do not show (a training
    run started some other way: the cron schedule, `flywheel train`)."""

    decisions: tuple[Decision, ...] = ()
    last_retrain_at: AwareDatetime | None = None

    def last_retrain(self, model: str) -> datetime | None:
        times = [d.at for d in self.decisions if d.model == model and d.fired]
        if self.last_retrain_at is not None:
            times.append(self.last_retrain_at)
        return max(times) if times else None


def decision_id(event_id: str, prior: int) -> str:
    """The id of the `prior`-th decision (0 = first) about one event id."""
    return str(uuid.uuid5(NAMESPACE, f"{event_id}#{prior}"))


def decide(signal: Signal, history: History, policy: TriggerPolicy, paused: bool | str, now: datetime) -> Decision:
    """Fire, or suppress with the reason (module docstring: the rules and their order).

    `paused`: False when the model's loop runs; True, or the pause's description (who, when, why), when it is
    paused. `now` comes from the project's clock."""
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    same_event = [d for d in history.decisions if d.event_id == signal.event_id]
    base = {"id": decision_id(signal.event_id, len(same_event)), "at": now, "model": signal.model,
            "kind": signal.kind, "event_id": signal.event_id, "evidence": signal.evidence,
            "occurred": signal.occurred}

    def suppressed(by: SuppressedBy, reason: str) -> Decision:
        return Decision(**base, outcome="suppressed", suppressed_by=by, reason=reason)

    original = next((d for d in sorted(same_event, key=lambda d: d.at)
                     if d.suppressed_by not in NOT_OBSERVED and d.suppressed_by != "duplicate"), None)
    if original is not None:
        first = "fired" if original.fired else f"suppressed: {original.reason}"
        when = iso_seconds(original.at)
        return suppressed("duplicate", f"duplicate of {original.id} ({signal.kind} {first} at {when})")
    if not getattr(policy.rule(signal.kind), "enabled", True):
        return suppressed("disabled", f"rule {signal.kind} is disabled (configs/triggers.yaml)")
    if signal.verdict == "below_threshold":
        return suppressed("below_threshold", f"below threshold: {signal.detail}".rstrip(": "))
    if signal.verdict == "too_few_rows":
        return suppressed("too_few_rows", f"too few rows: {signal.detail}".rstrip(": "))
    if signal.automatic:
        if paused:
            return suppressed("paused", "loop paused" + (f" ({paused})" if isinstance(paused, str) else ""))
        last = history.last_retrain(signal.model)
        cooldown = policy.discipline.cooldown
        if last is not None and cooldown > timedelta(0) and now < last + cooldown:
            return suppressed("cooldown", f"cooldown until {iso_seconds(last + cooldown)} (last retrain "
                                          f"{iso_seconds(last)}; cooldown {describe_duration(cooldown)})")
    # what the retrain trains on, when the rule says (configs/triggers.yaml): recorded with the evidence, so a
    # re-sent event carries it too, and put in the event's payload for the training run's parameters
    source = getattr(policy.rule(signal.kind), "training_source", None)
    if source is not None:
        base["evidence"] = {**signal.evidence, TRAINING_SOURCE: source}
    return Decision(**base, outcome="fire", reason=f"{signal.kind}: {signal.detail}".rstrip(": "))


# ------------------------------------------------------------------------------------------ evaluators


def drift_signal(alarm: bool, *, model: str, event_id: str, occurred: datetime,
                 evidence: dict[str, Any] | None = None, detail: str = "") -> Signal:
    """Monitoring's drift verdict of one window (its alarm, after persistence) as a signal; `event_id` names
    the window, so a window's alarm is decided once."""
    return Signal(kind="drift_detected", model=model, event_id=event_id, occurred=occurred,
                  evidence=evidence or {}, verdict="met" if alarm else "below_threshold",
                  detail=detail or ("drift alarm raised" if alarm else "no drift alarm"))


def request_signal(*, model: str, reason: str, actor: str, event_id: str, occurred: datetime,
                   source: str = "cli", delivery: str | None = None) -> Signal:
    """An explicit retrain request (webhook or CLI); `delivery`: the webhook delivery id it came with."""
    evidence = {"reason": reason, "actor": actor, "source": source}
    if delivery is not None:
        evidence["delivery"] = delivery
    return Signal(kind="retrain_requested", model=model, event_id=event_id, occurred=occurred, evidence=evidence,
                  detail=f"requested by {actor} via {source}: {reason}")


def pick_performance(realized: Performance | None, estimated: Estimate | None,
                     policy: PerformanceRule) -> Performance | Estimate | None:
    """The figure to judge: realized once `min_labelled_rows` outcomes arrived, else the estimate (if allowed)."""
    if realized is not None and realized.n >= policy.min_labelled_rows:
        return realized
    if estimated is not None and policy.use_estimate:
        return estimated
    return realized


def performance_signal(reading: Performance | Estimate, policy: PerformanceRule, *, model: str, event_id: str,
                       occurred: datetime, reference: float | None = None) -> Signal:
    """A realized (`Performance`) or estimated (`Estimate`) figure against the floor and the drop allowed
    below `reference` (the champion's metric at its gates, when known)."""
    figure = getattr(reading, policy.metric)
    estimated = hasattr(figure, "value")  # Estimate holds MetricEstimates, Performance plain floats
    source = "estimated" if estimated else "realized"
    if estimated:
        value = figure.upper if policy.estimate_basis == "upper" else figure.value
        interval = [round(figure.lower, 4), round(figure.upper, 4)]
    else:
        value, interval = float(figure), None
    min_rows = policy.min_scored_rows if estimated else policy.min_labelled_rows
    evidence = {"metric": policy.metric, "source": source, "value": round(value, 4), "n": reading.n,
                "min_value": policy.min_value, "max_drop": policy.max_drop, "reference": reference}
    if interval:
        evidence["interval"] = interval
        evidence["basis"] = policy.estimate_basis
    rows = "scored" if estimated else "labelled"
    what = f"{source} {policy.metric} {value:.3f} on {reading.n} {rows} rows"

    def signal(verdict: Verdict, detail: str) -> Signal:
        return Signal(kind="performance_degraded", model=model, event_id=event_id, occurred=occurred,
                      evidence=evidence, verdict=verdict, detail=detail)

    if reading.n < min_rows or math.isnan(value):
        return signal("too_few_rows", f"{what} (fewer than {min_rows}: not judged)")
    if value < policy.min_value:
        return signal("met", f"{what} < floor {policy.min_value:.3f}")
    if reference is not None and policy.max_drop is not None and value < reference - policy.max_drop:
        return signal("met", f"{what} is {reference - value:.3f} below the reference {reference:.3f} "
                             f"(max drop {policy.max_drop:.3f})")
    ref = f", reference {reference:.3f} - {policy.max_drop:.3f}" if reference is not None and policy.max_drop else ""
    return signal("below_threshold", f"{what} >= floor {policy.min_value:.3f}{ref}")


def volume_signal(new_labelled_rows: int, policy: VolumeRule, *, model: str, occurred: datetime,
                  since: datetime | None, event_id: str | None = None) -> Signal:
    """New labelled rows since the last training (`since`) against `min_new_labelled_rows`. The default event
    id names the training it counts from and how many times over the threshold the volume is
    (`volume_reached:<model>:<last training>:x<k>`): it fires once per training and multiple, so a volume held
    by the cooldown is decided again when it doubles. The monitoring run and the ingest runs count the same
    rows, so they name the same condition alike and dedupe decides it once."""
    if new_labelled_rows < 0:
        raise ValueError("new_labelled_rows must be >= 0")
    n, need = new_labelled_rows, policy.min_new_labelled_rows
    event_id = event_id or (f"volume_reached:{model}:{iso_seconds(since) if since else 'never-trained'}"
                            f":x{max(n // need, 1)}")
    since_text = f"since {iso_seconds(since)}" if since else "with no training yet"
    return Signal(kind="volume_reached", model=model, event_id=event_id, occurred=occurred,
                  evidence={"new_labelled_rows": n, "min_new_labelled_rows": need,
                            "since": iso_seconds(since) if since else None},
                  verdict="met" if n >= need else "too_few_rows",
                  detail=f"{n} new labelled rows {since_text} ({'>=' if n >= need else '<'} {need})")


def staleness_signal(champion_registered_at: datetime, now: datetime, policy: StalenessRule, *, model: str,
                     version: str, event_id: str | None = None) -> Signal:
    """The champion's age against `max_age`. The default event id names the version and how many `max_age`
    periods it has served: it fires once when it becomes stale, again each further period."""
    age = now - champion_registered_at
    periods = max(0, math.floor(age / policy.max_age))
    event_id = event_id or f"model_stale:{model}:v{version}:{periods}"
    stale = age >= policy.max_age
    return Signal(kind="model_stale", model=model, event_id=event_id, occurred=now,
                  evidence={"version": str(version), "registered_at": iso_seconds(champion_registered_at),
                            "age_s": round(age.total_seconds()), "max_age_s": policy.max_age.total_seconds()},
                  verdict="met" if stale else "below_threshold",
                  detail=f"champion v{version} is {describe_age(age)} old "
                         f"({'>=' if stale else '<'} max age {describe_duration(policy.max_age)})")


def describe_age(age: timedelta) -> str:
    seconds = age.total_seconds()
    if seconds >= 86_400:
        return f"{seconds / 86_400:.1f} days"
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} hours"
    return f"{seconds / 60:.0f} minutes"


def liveness_alarms(last_monitoring_at: datetime | None, last_outcome_at: datetime | None, now: datetime,
                    policy: Liveness, *, model: str, watched_since: datetime | None = None,
                    report_url: str | None = None) -> list[Alarm]:
    """A silent loop is an alarm too: monitoring or outcomes quiet for longer than their maximum silence.
    Nothing recorded yet counts from `watched_since` (when the model started being served); without it,
    nothing ever recorded is an alarm at once. Each alarm's id names the silence, so it is sent once."""
    alarms = []
    for what, last, limit in (("monitoring", last_monitoring_at, policy.monitoring_max_silence),
                              ("outcomes", last_outcome_at, policy.outcomes_max_silence)):
        start = last or watched_since
        if start is not None and now - start <= limit:
            continue
        noun = "judged monitoring window" if what == "monitoring" else "outcome (delayed label)"
        if last is None:
            since = f"since {iso_seconds(watched_since)}" if watched_since else "ever"
            summary = f"{model}: no {noun} recorded {since} (max silence {describe_duration(limit)})"
        else:
            summary = (f"{model}: no {noun} for {describe_age(now - last)} (last {iso_seconds(last)}; max silence "
                       f"{describe_duration(limit)})")
        silence_key = iso_seconds(last) if last else f"none:{iso_seconds(watched_since) if watched_since else ''}"
        alarms.append(Alarm(
            id=alarm_id("liveness", model, what, silence_key),
            kind="liveness", model=model, summary=summary, occurred=now, severity="critical",
            evidence={"silent": what, "last_at": iso_seconds(last) if last else None,
                      "max_silence_s": limit.total_seconds(),
                      "silence_s": round((now - start).total_seconds()) if start else None},
            report_url=report_url))
    return alarms


def alarm_for(signal: Signal, report_url: str | None = None) -> Alarm | None:
    """The alarm a met drift or performance signal raises for people (fired or not: a suppressed retrain is
    still news); None for other kinds and unmet signals."""
    kinds = {"drift_detected": "drift", "performance_degraded": "performance"}
    if signal.kind not in kinds or signal.verdict != "met":
        return None
    return Alarm(id=alarm_id("signal", signal.kind, signal.event_id), kind=kinds[signal.kind],  # type: ignore[arg-type]
                 model=signal.model, summary=f"{signal.model}: {signal.detail}", occurred=signal.occurred,
                 evidence=signal.evidence, report_url=report_url)


# ---------------------------------------------------------------------------- the loop's own state


class ChampionState(_Strict):
    """What the volume, staleness and liveness checks read, gathered once per monitoring run."""

    model: str
    version: str  # the champion's
    registered_at: AwareDatetime  # the champion's registration: staleness counts from it
    last_training_at: AwareDatetime | None = None  # the newest version's first alias (tasks/landing.py)
    new_labelled_rows: int = Field(ge=0)  # labelled rows (batch labels + outcomes) arrived since last_training_at
    last_outcome_at: AwareDatetime | None = None  # the latest outcome arrival (any snapshot)
    last_monitoring_at: AwareDatetime | None = None  # the latest judged window before this run


def loop_signals(state: ChampionState, policy: TriggerPolicy, now: datetime) -> list[Signal]:
    """The volume and staleness signals of the champion. Volume counts from the last training and is named as
    the ingest runs name it (`volume_signal`); staleness by how many `max_age` periods the version served."""
    signals = [volume_signal(state.new_labelled_rows, policy.rules.volume_reached, model=state.model,
                             occurred=now, since=state.last_training_at)]
    signals.append(staleness_signal(state.registered_at, now, policy.rules.model_stale, model=state.model,
                                     version=state.version))
    # the evidence names the champion the figures are about
    return [s.model_copy(update={"evidence": {"version": state.version, **s.evidence}}) for s in signals]
