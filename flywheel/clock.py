"""The one clock the project's own logic reads: trigger cooldowns, model staleness, liveness, windows,
a training's `as_of`, ingest and scoring times, the alias audit log.

Logic never calls `datetime.now()` itself: it takes `now`, and the entry point that calls it asks a
`Clock`. In production that is the wall clock. For the demo a `SimulatedClock` runs days in seconds, so
a weekly schedule, a 6-hour cooldown and a 30-day staleness limit all happen while a person watches.

What stays on wall time whatever the clock: Prefect (schedules, concurrency slots, event dedupe, run
times), HMAC signature timestamps (the receiver compares them with its own wall clock), HTTP timeouts
and retry back-off, lock leases, MLflow's record times. A simulated clock only moves the project's
decisions, never the machinery's (tests/unit/test_wall_time_guard.py lists every wall-time read).

Several processes (the CLI, a served flow, the service) agree on a simulated time when they share its
`anchor`: the wall time at which the simulation stood at `start`. Without one, each process anchors at
the moment it built the clock (good enough for one process, such as a test); `flywheel up` fixes one for
the whole stack (flywheel/stack.py). Without a `start` the simulation starts at its anchor: simulated time
then never runs behind the wall clock, so ages measured from any wall-time record left (one written
before the clock was simulated) stay positive and only grow faster.
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
    """Simulated time: `start` at wall time `anchor`, then one simulated day per `seconds_per_day` wall seconds.
    No `start`: the simulation starts at its anchor."""

    def __init__(self, start: datetime | None, seconds_per_day: float, anchor: datetime | None = None,
                 wall: Callable[[], datetime] = wall_now) -> None:
        if seconds_per_day <= 0:
            raise ValueError(f"seconds_per_day must be > 0, got {seconds_per_day}")
        if (start is not None and start.tzinfo is None) or (anchor is not None and anchor.tzinfo is None):
            raise ValueError("start and anchor must be timezone-aware")
        self.seconds_per_day = float(seconds_per_day)
        self._wall = wall
        self.anchor = (anchor or wall()).astimezone(UTC)
        self.start = (start or self.anchor).astimezone(UTC)

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
    start: AwareDatetime | None = None  # the simulated time at `anchor` (None: the anchor itself)
    seconds_per_day: float = Field(gt=0, le=SECONDS_PER_DAY)
    anchor: AwareDatetime | None = None  # wall time at which the simulation stood at `start` (None: at build)


ClockConfig = Annotated[WallClockConfig | SimulatedClockConfig, Field(discriminator="kind")]


def anchored(cfg: WallClockConfig | SimulatedClockConfig, wall: Callable[[], datetime] = wall_now,
             ) -> WallClockConfig | SimulatedClockConfig:
    """`cfg` with its anchor (and so its start) fixed now when it has none: what several processes share."""
    if not isinstance(cfg, SimulatedClockConfig) or (cfg.anchor is not None and cfg.start is not None):
        return cfg
    anchor = cfg.anchor or wall().astimezone(UTC)
    return cfg.model_copy(update={"anchor": anchor, "start": cfg.start or anchor})


def clock_env(cfg: WallClockConfig | SimulatedClockConfig) -> dict[str, str]:
    """The FLYWHEEL_CLOCK__* variables under which any settings load builds this (anchored) clock; {} for wall."""
    if not isinstance(cfg, SimulatedClockConfig):
        return {}
    cfg = anchored(cfg)
    assert cfg.start is not None and cfg.anchor is not None
    return {"FLYWHEEL_CLOCK__KIND": "simulated", "FLYWHEEL_CLOCK__START": cfg.start.isoformat(),
            "FLYWHEEL_CLOCK__SECONDS_PER_DAY": repr(cfg.seconds_per_day),
            "FLYWHEEL_CLOCK__ANCHOR": cfg.anchor.isoformat()}


def same_clock(running: WallClockConfig | SimulatedClockConfig, wanted: WallClockConfig | SimulatedClockConfig,
               ) -> bool:
    """Whether `wanted` (settings) describes the `running` (anchored) clock: an unset start or anchor in
    `wanted` matches any."""
    if isinstance(running, SimulatedClockConfig) and isinstance(wanted, SimulatedClockConfig):
        return (running.seconds_per_day == wanted.seconds_per_day
                and wanted.start in (None, running.start) and wanted.anchor in (None, running.anchor))
    return type(running) is type(wanted)


def describe_clock(clock: Clock) -> str:
    """One line for people: what the clock is and the time it tells."""
    now = clock.now()
    if isinstance(clock, SimulatedClock):
        return (f"simulated: {now:%Y-%m-%d %H:%M:%S} UTC (1 day per {clock.seconds_per_day:g} s, x{clock.speed:g}; "
                f"stood at {clock.start:%Y-%m-%d %H:%M:%S} at wall {clock.anchor:%Y-%m-%d %H:%M:%S} UTC)")
    return f"{type(clock).__name__.removesuffix('Clock').lower()}: {now:%Y-%m-%d %H:%M:%S} UTC"


def build_clock(cfg: WallClockConfig | SimulatedClockConfig, wall: Callable[[], datetime] = wall_now) -> Clock:
    """The clock a config describes."""
    if isinstance(cfg, SimulatedClockConfig):
        return SimulatedClock(cfg.start, cfg.seconds_per_day, cfg.anchor, wall)
    return WallClock()
