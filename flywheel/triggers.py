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

Explicit requests (`retrain_requested`: the signed webhook, `flywheel retrain`) are held only by dedupe and
by the training deployment's concurrency limit, never by the cooldown or a pause: a person asked.

Decision ids are deterministic (uuid5 of the signal's event id and how many decisions that event id had
before), so two processes deciding the same signal at once compute the same id and the database's primary
key lets only one of them record it; the loser decides again and finds a duplicate. The id of a fired
decision is the id of the event it emits, so a re-emitted event is dropped by Prefect's own dedupe.

Pure: no Prefect, MLflow, database or clock inside; `now` is passed in (flywheel/clock.py).
"""

from __future__ import annotations

import math
import re
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import AwareDatetime, BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

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



# ------------------------------------------------------------------------------------------ durations

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")


def parse_duration(value: Any) -> timedelta:
    """`90s`, `15m`, `6h`, `30d`, `1w`, a number of seconds, or a timedelta."""
    if isinstance(value, timedelta):
        return value
    if isinstance(value, bool):
        raise ValueError("a duration, e.g. 6h, 30d, 15m (got a boolean)")
    if isinstance(value, int | float):
        return timedelta(seconds=float(value))
    if isinstance(value, str) and (m := _DURATION.match(value)):
        return timedelta(seconds=float(m.group(1)) * _UNITS[m.group(2)])
    raise ValueError(f"{value!r} is not a duration: a number and a unit among s, m, h, d, w (e.g. 6h, 30d)")


Duration = Annotated[timedelta, BeforeValidator(parse_duration)]


def describe_duration(td: timedelta) -> str:
    seconds = td.total_seconds()
    for unit, size in (("w", 604_800), ("d", 86_400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def _iso(dt: datetime) -> str:
    return dt.astimezone(UTC).isoformat(timespec="seconds")


# ----------------------------------------------------------------------------------------------- cron

_FIELDS = (("minute", 0, 59), ("hour", 0, 23), ("day of month", 1, 31), ("month", 1, 12), ("day of week", 0, 7))
_NAMES = {3: ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"],
          4: ["sun", "mon", "tue", "wed", "thu", "fri", "sat"]}


def check_cron(expr: str) -> str:
    """A five-field cron expression (minute hour day-of-month month day-of-week), as Prefect takes it."""
    fields = expr.split()
    if len(fields) != 5:
        raise ValueError(f"{expr!r}: a cron expression has 5 fields (minute hour day-of-month month day-of-week)")
    for i, (text, (name, lo, hi)) in enumerate(zip(fields, _FIELDS, strict=True)):
        names = _NAMES.get(i, [])

        def value(token: str, name: str = name, lo: int = lo, hi: int = hi, names: list[str] = names) -> int:
            if token.lower() in names:
                return names.index(token.lower()) + (1 if name == "month" else 0)
            if not token.isdigit() or not lo <= int(token) <= hi:
                raise ValueError(f"{expr!r}: {name} {token!r} is not in {lo}-{hi}")
            return int(token)

        for part in text.split(","):
            base, _, step = part.partition("/")
            if step and (not step.isdigit() or int(step) < 1):
                raise ValueError(f"{expr!r}: {name} step {step!r} must be a positive number")
            if base == "*":
                continue
            start, _, end = base.partition("-")
            if end and value(start) > value(end):
                raise ValueError(f"{expr!r}: {name} range {base!r} runs backwards")
            value(start)
    return expr


Cron = Annotated[str, BeforeValidator(lambda v: check_cron(v) if isinstance(v, str) else v)]


# --------------------------------------------------------------------------------------------- policy


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CronSchedule(_Strict):
    cron: Cron
    timezone: str = "UTC"
    active: bool = True


class BatchScoringSchedule(_Strict):
    """Nightly batch scoring. Its cron is `batch.cron` in the settings (one source: `flywheel up` serves the
    deployment on it, and deployments/prefect.yaml is checked against it), not repeated here."""

    active: bool = True
    timezone: str = "UTC"

    @model_validator(mode="before")
    @classmethod
    def _cron_lives_in_settings(cls, data: Any) -> Any:
        if isinstance(data, dict) and "cron" in data:
            raise ValueError("batch_scoring's cron is the setting batch.cron (configs/base.yaml or a profile): "
                             "set it there, so that one value schedules the deployment")
        return data


class Schedules(_Strict):
    """Cron schedules of the loop's deployments (Prefect runs them on wall time)."""

    monitoring: CronSchedule = CronSchedule(cron="0 * * * *")  # hourly
    materialization: CronSchedule = CronSchedule(cron="30 * * * *")
    batch_scoring: BatchScoringSchedule = BatchScoringSchedule()
    training: CronSchedule = CronSchedule(cron="0 3 * * 1", active=False)  # weekly; off: events drive training


class DriftRule(_Strict):
    """Retrain when monitoring raises its drift alarm (after its own minimum sample, FDR and persistence)."""

    enabled: bool = True


class PerformanceRule(_Strict):
    """Retrain when the champion's performance falls: realized on outcomes when `min_labelled_rows` have
    arrived, else estimated from its probabilities alone (flywheel/monitoring/performance.py)."""

    enabled: bool = True
    metric: Literal["roc_auc", "accuracy"] = "roc_auc"
    min_value: float = Field(0.70, ge=0, le=1)  # absolute floor
    max_drop: float | None = Field(0.05, ge=0, le=1)  # below the reference (the champion at its gates) by more
    min_labelled_rows: int = Field(500, ge=1)  # realized figures on fewer rows are not judged
    min_scored_rows: int = Field(1000, ge=1)  # estimates on fewer rows are not judged
    use_estimate: bool = True  # false: without enough outcomes the rule waits for them
    # which end of the estimate is compared: its value, or the upper end of its interval (acts only when
    # even the optimistic end is below the threshold)
    estimate_basis: Literal["value", "upper"] = "value"


class VolumeRule(_Strict):
    """Retrain when enough new labelled rows arrived since the last training."""

    enabled: bool = True
    min_new_labelled_rows: int = Field(5000, ge=1)


class StalenessRule(_Strict):
    """Retrain a champion older than `max_age` (again each further `max_age` it stays champion)."""

    enabled: bool = True
    max_age: Duration = timedelta(days=30)

    @field_validator("max_age")
    @classmethod
    def _positive(cls, value: timedelta) -> timedelta:
        if value <= timedelta(0):
            raise ValueError("max_age must be positive")
        return value


class RequestRule(_Strict):
    """Explicit retrain requests (the signed webhook, `flywheel retrain`): no cooldown, no pause."""

    enabled: bool = True


class Rules(_Strict):
    drift_detected: DriftRule = DriftRule()
    performance_degraded: PerformanceRule = PerformanceRule()
    volume_reached: VolumeRule = VolumeRule()
    model_stale: StalenessRule = StalenessRule()
    retrain_requested: RequestRule = RequestRule()


class Discipline(_Strict):
    # no automatic retrain of a model within this long of its last retrain (0 switches the cooldown off)
    cooldown: Duration = timedelta(hours=6)

    @field_validator("cooldown")
    @classmethod
    def _not_negative(cls, value: timedelta) -> timedelta:
        if value < timedelta(0):
            raise ValueError("cooldown must not be negative")
        return value


class Liveness(_Strict):
    """A silent loop is an alarm too: no judged monitoring window, or no outcome, for this long."""

    monitoring_max_silence: Duration = timedelta(hours=3)
    outcomes_max_silence: Duration = timedelta(days=2)

    @field_validator("monitoring_max_silence", "outcomes_max_silence")
    @classmethod
    def _positive(cls, value: timedelta) -> timedelta:
        if value <= timedelta(0):
            raise ValueError("a maximum silence must be positive")
        return value


class TriggerPolicy(_Strict):
    """configs/triggers.yaml."""

    schedules: Schedules = Schedules()
    rules: Rules = Rules()
    discipline: Discipline = Discipline()
    liveness: Liveness = Liveness()

    def rule(self, kind: str) -> _Strict:
        return getattr(self.rules, kind)


def load_policy(path: Path) -> TriggerPolicy:
    """configs/triggers.yaml, strictly: an unknown key or a bad value fails naming the file and the key."""
    from flywheel.settings import load_yaml_model

    return load_yaml_model(TriggerPolicy, Path(path))


class DeploymentSchedule(_Strict):
    cron: str
    timezone: str
    active: bool


def deployment_schedules(policy: TriggerPolicy, batch_cron: str) -> dict[str, DeploymentSchedule]:
    """Deployment name -> its cron schedule (batch scoring's cron from `batch.cron`)."""
    s = policy.schedules
    out = {name: DeploymentSchedule(cron=c.cron, timezone=c.timezone, active=c.active)
           for name, c in (("monitoring", s.monitoring), ("materialization", s.materialization),
                           ("training", s.training))}
    out["batch-scoring"] = DeploymentSchedule(cron=check_cron(batch_cron), timezone=s.batch_scoring.timezone,
                                              active=s.batch_scoring.active)
    return out


# ------------------------------------------------------------------------------------ signals, decisions


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
        return suppressed("duplicate", f"duplicate of {original.id} ({signal.kind} {first} at {_iso(original.at)})")
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
            return suppressed("cooldown", f"cooldown until {_iso(last + cooldown)} (last retrain {_iso(last)}; "
                                          f"cooldown {describe_duration(cooldown)})")
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
                   source: str = "cli") -> Signal:
    """An explicit retrain request (webhook or CLI)."""
    return Signal(kind="retrain_requested", model=model, event_id=event_id, occurred=occurred,
                  evidence={"reason": reason, "actor": actor, "source": source},
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
    id names the training it counts from: the volume fires once per training."""
    if new_labelled_rows < 0:
        raise ValueError("new_labelled_rows must be >= 0")
    event_id = event_id or f"volume_reached:{model}:{_iso(since) if since else 'never-trained'}"
    n, need = new_labelled_rows, policy.min_new_labelled_rows
    since_text = f"since {_iso(since)}" if since else "with no training yet"
    return Signal(kind="volume_reached", model=model, event_id=event_id, occurred=occurred,
                  evidence={"new_labelled_rows": n, "min_new_labelled_rows": need,
                            "since": _iso(since) if since else None},
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
                  evidence={"version": str(version), "registered_at": _iso(champion_registered_at),
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
            since = f"since {_iso(watched_since)}" if watched_since else "ever"
            summary = f"{model}: no {noun} recorded {since} (max silence {describe_duration(limit)})"
        else:
            summary = (f"{model}: no {noun} for {describe_age(now - last)} (last {_iso(last)}; max silence "
                       f"{describe_duration(limit)})")
        silence_key = _iso(last) if last else f"none:{_iso(watched_since) if watched_since else ''}"
        alarms.append(Alarm(
            id=alarm_id("liveness", model, what, silence_key),
            kind="liveness", model=model, summary=summary, occurred=now, severity="critical",
            evidence={"silent": what, "last_at": _iso(last) if last else None, "max_silence_s": limit.total_seconds(),
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
