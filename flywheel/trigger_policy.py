"""The trigger policy, configs/triggers.yaml (the setting `triggers.policy_file`): cron schedules of the loop's
deployments, the event rules and their thresholds, the cooldown, liveness. Strict and frozen: an unknown
key or a bad value fails at load naming the file and the key. Durations are written `90s`, `15m`, `6h`,
`30d`, `1w` (or seconds); cron expressions are checked field by field.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

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


def iso_seconds(dt: datetime) -> str:
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


TrainingSource = Literal["offline_store", "served_features"]


class _AutomaticRule(_Strict):
    """What every automatic rule takes: on/off, and what its retrain trains on. `training_source` None: the
    dataset definition's own; `served_features`: the features the service actually used, joined with their
    outcomes (the run fails, naming the count, when too few have joined: it never falls back)."""

    enabled: bool = True
    training_source: TrainingSource | None = None


class DriftRule(_AutomaticRule):
    """Retrain when monitoring raises its drift alarm (after its own minimum sample, FDR and persistence)."""


class PerformanceRule(_AutomaticRule):
    """Retrain when the champion's performance falls: realized on outcomes when `min_labelled_rows` have
    arrived, else estimated from its probabilities alone (flywheel/monitoring/performance.py)."""
    metric: Literal["roc_auc", "accuracy"] = "roc_auc"
    min_value: float = Field(0.70, ge=0, le=1)  # absolute floor
    max_drop: float | None = Field(0.05, ge=0, le=1)  # below the reference (the champion at its gates) by more
    min_labelled_rows: int = Field(500, ge=1)  # realized figures on fewer rows are not judged
    min_scored_rows: int = Field(1000, ge=1)  # estimates on fewer rows are not judged
    use_estimate: bool = True  # false: without enough outcomes the rule waits for them
    # which end of the estimate is compared: its value, or the upper end of its interval (acts only when
    # even the optimistic end is below the threshold)
    estimate_basis: Literal["value", "upper"] = "value"


class VolumeRule(_AutomaticRule):
    """Retrain when enough new labelled rows arrived since the last training."""
    min_new_labelled_rows: int = Field(5000, ge=1)


class StalenessRule(_AutomaticRule):
    """Retrain a champion older than `max_age` (again each further `max_age` it stays champion)."""
    max_age: Duration = timedelta(days=30)

    @field_validator("max_age")
    @classmethod
    def _positive(cls, value: timedelta) -> timedelta:
        if value <= timedelta(0):
            raise ValueError("max_age must be positive")
        return value


class RequestRule(_Strict):
    """Explicit retrain requests (the signed webhook, `flywheel retrain`): no cooldown, no pause. They train
    on the dataset definition's own source (no `training_source` here: a request names no evidence)."""

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
