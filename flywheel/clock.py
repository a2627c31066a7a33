"""The one clock the project's own logic reads: trigger cooldowns, model staleness, liveness, windows.

Logic never calls `datetime.now()` itself: it takes `now`, and the entry point that calls it asks a
`Clock`. In production that is the wall clock. For the demo a `SimulatedClock` runs days in seconds, so
a weekly schedule, a 6-hour cooldown and a 30-day staleness limit all happen while a person watches.

What stays on wall time whatever the clock: Prefect (schedules, concurrency slots, event dedupe, run
times), HMAC signature timestamps (the receiver compares them with its own wall clock), HTTP timeouts
and retry back-off. A simulated clock only moves the project's decisions, never the machinery's.

Several processes (the CLI, a served flow, the service) agree on a simulated time when they share its
`anchor`: the wall time at which the simulation stood at `start`. Without one, each process anchors at
the moment it built the clock (good enough for one process, such as a test).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Annotated, Literal, Protocol, runtime_checkable

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

SECONDS_PER_DAY = 86_400.0


@runtime_checkable
class Clock(Protocol):
    """Tells the time the project's logic runs on (always timezone-aware UTC)."""

    def now(self) -> datetime: ...


def wall_now() -> datetime:
    return datetime.now(UTC)


class WallClock:
    """The machine's clock, in UTC."""

    def now(self) -> datetime:
        return wall_now()

    def __repr__(self) -> str:
        return "WallClock()"


class SimulatedClock:
    """Simulated time: `start` at wall time `anchor`, then one simulated day per `seconds_per_day` wall seconds."""

    def __init__(self, start: datetime, seconds_per_day: float, anchor: datetime | None = None,
                 wall: Callable[[], datetime] = wall_now) -> None:
        if seconds_per_day <= 0:
            raise ValueError(f"seconds_per_day must be > 0, got {seconds_per_day}")
        if start.tzinfo is None or (anchor is not None and anchor.tzinfo is None):
            raise ValueError("start and anchor must be timezone-aware")
        self.start = start.astimezone(UTC)
        self.seconds_per_day = float(seconds_per_day)
        self._wall = wall
        self.anchor = (anchor or wall()).astimezone(UTC)

    @property
    def speed(self) -> float:
        """Simulated seconds per wall second."""
        return SECONDS_PER_DAY / self.seconds_per_day

    def now(self) -> datetime:
        elapsed = (self._wall() - self.anchor).total_seconds()
        return self.start + timedelta(seconds=elapsed * self.speed)

    def __repr__(self) -> str:
        return f"SimulatedClock(start={self.start.isoformat()}, seconds_per_day={self.seconds_per_day:g})"


class ManualClock:
    """A clock that moves only when told to (tests)."""

    def __init__(self, at: datetime) -> None:
        if at.tzinfo is None:
            raise ValueError("ManualClock needs a timezone-aware time")
        self.at = at.astimezone(UTC)

    def now(self) -> datetime:
        return self.at

    def advance(self, delta: timedelta) -> datetime:
        self.at = self.at + delta
        return self.at


# ------------------------------------------------------------------------------------------ config


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class WallClockConfig(_Strict):
    kind: Literal["wall"] = "wall"


class SimulatedClockConfig(_Strict):
    """Days in seconds, for the demo. Processes sharing `anchor` agree on the simulated time."""

    kind: Literal["simulated"]
    start: AwareDatetime  # the simulated time at `anchor`
    seconds_per_day: float = Field(gt=0, le=SECONDS_PER_DAY)
    anchor: AwareDatetime | None = None  # wall time at which the simulation stood at `start` (None: at build)


ClockConfig = Annotated[WallClockConfig | SimulatedClockConfig, Field(discriminator="kind")]


def build_clock(cfg: WallClockConfig | SimulatedClockConfig, wall: Callable[[], datetime] = wall_now) -> Clock:
    """The clock a config describes."""
    if isinstance(cfg, SimulatedClockConfig):
        return SimulatedClock(cfg.start, cfg.seconds_per_day, cfg.anchor, wall)
    return WallClock()
