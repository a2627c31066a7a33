"""The project's one clock: a simulated clock anchored once per stack, read alike by every process; the
pieces routed through it (the monitoring window, the demo's timeline) on a ManualClock."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from flywheel.clock import (
    ManualClock,
    SimulatedClock,
    SimulatedClockConfig,
    WallClockConfig,
    anchored,
    build_clock,
    clock_env,
    describe_clock,
    same_clock,
)
from flywheel.errors import StackError

WALL = datetime(2026, 12, 2, 10, 0, tzinfo=UTC)
DEMO = SimulatedClockConfig(kind="simulated", seconds_per_day=600)  # `make demo`'s: no start, no anchor


def _simulated(settings: Any, cfg: SimulatedClockConfig = DEMO) -> Any:
    return settings.model_copy(update={"clock": cfg})


def test_a_simulated_clock_without_a_start_starts_at_its_anchor_and_runs_at_its_speed() -> None:
    wall = ManualClock(WALL)
    clock = SimulatedClock(None, 600, wall=wall.now)
    assert clock.start == clock.anchor == WALL and clock.speed == 144
    wall.advance(timedelta(seconds=150))
    assert clock.now() == WALL + timedelta(hours=6)  # 150 wall seconds: the default cooldown
    assert "simulated: 2026-12-02 16:00:00 UTC (1 day per 600 s, x144" in describe_clock(clock)


def test_anchoring_fixes_start_and_anchor_once_and_the_variables_rebuild_the_same_clock(settings: Any) -> None:
    from flywheel.settings import load_settings

    fixed = anchored(DEMO, wall=lambda: WALL)
    assert (fixed.start, fixed.anchor) == (WALL, WALL)
    assert anchored(fixed, wall=lambda: WALL + timedelta(days=1)) == fixed, "an anchored clock keeps its anchor"
    assert anchored(WallClockConfig()) == WallClockConfig() and clock_env(WallClockConfig()) == {}
    env = clock_env(fixed)
    assert env["FLYWHEEL_CLOCK__ANCHOR"] == WALL.isoformat()
    loaded = load_settings("ci", settings.paths.home / "configs", environ=env)  # the ci profile says `wall`
    assert loaded.clock == fixed


def test_same_clock_matches_unset_start_and_anchor_but_not_another_speed_or_kind() -> None:
    running = anchored(DEMO, wall=lambda: WALL)
    assert same_clock(running, DEMO) and same_clock(running, running)
    assert not same_clock(running, DEMO.model_copy(update={"seconds_per_day": 60}))
    assert not same_clock(running, DEMO.model_copy(update={"start": WALL - timedelta(days=1)}))
    assert not same_clock(running, WallClockConfig()) and not same_clock(WallClockConfig(), DEMO)
    assert same_clock(WallClockConfig(), WallClockConfig())


def test_up_records_one_anchor_a_running_stack_keeps_it_and_refuses_another_clock(settings: Any) -> None:
    from flywheel.stack import read_clock, settle_clock

    directory = settings.resolve(settings.stack.pid_dir)
    first = settle_clock(directory, DEMO, running=False)
    assert isinstance(first, SimulatedClockConfig) and first.anchor is not None
    assert read_clock(directory) == first
    assert settle_clock(directory, DEMO, running=True) == first, "a process restarted later gets the same anchor"
    with pytest.raises(StackError, match=r"running stack's clock is simulated \(1 day per 600 s.*ask for wall"):
        settle_clock(directory, WallClockConfig(), running=True)
    assert read_clock(directory) == first, "refused: nothing rewritten"
    assert settle_clock(directory, WallClockConfig(), running=False) == WallClockConfig(), "a new stack: new clock"
    (directory / "clock.json").write_text("{\"kind\": \"sundial\"}")
    with pytest.raises(StackError, match="not a Flywheel clock record"):
        read_clock(directory)


def test_entry_points_on_a_running_stack_take_its_clock_even_with_the_api_url_set(
    settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`use_active_stack` exports the running stack's clock (the demo's in-process flows load their settings
    after it), and `project_clock` keeps telling it once PREFECT_API_URL is set; with no live process of
    the stack, the settings' own clock."""
    import os

    import psutil

    from flywheel.stack import URL_FILE, PidRecord, project_clock, settle_clock, use_active_stack, write_record

    for name in ("PREFECT_API_URL", *clock_env(anchored(DEMO))):
        monkeypatch.delenv(name, raising=False)
    directory = settings.resolve(settings.stack.pid_dir)
    recorded = settle_clock(directory, DEMO, running=False)
    assert not isinstance(project_clock(settings), SimulatedClock), "no live process: the settings' wall clock"
    me = psutil.Process()  # this test process stands in for the stack's server
    write_record(directory, PidRecord(name="prefect", pid=me.pid, create_time=me.create_time(), argv=["test"]))
    (directory / URL_FILE).write_text("http://127.0.0.1:1/api\n")
    assert use_active_stack(settings) == "http://127.0.0.1:1/api"
    assert os.environ["FLYWHEEL_CLOCK__ANCHOR"] == recorded.anchor.isoformat()
    clock = project_clock(settings)
    assert isinstance(clock, SimulatedClock) and clock.anchor == recorded.anchor and clock.start == recorded.start


CHILD = """
import sys
from datetime import datetime
from flywheel.clock import build_clock
from flywheel.settings import load_settings
wall = datetime.fromisoformat(sys.argv[2])
print(build_clock(load_settings("ci", sys.argv[1]).clock, wall=lambda: wall).now().isoformat())
"""


def test_two_processes_of_the_stack_tell_the_same_simulated_time(settings: Any) -> None:
    """The children `up` starts get the recorded anchor in their environment; each builds its clock from its
    own settings load, and at the same wall instant they and the parent tell the same simulated time."""
    from flywheel.stack import _base_env, read_clock, settle_clock

    sim = _simulated(settings)
    settle_clock(sim.resolve(sim.stack.pid_dir), sim.clock, running=False)
    env = _base_env(sim)
    at = datetime.now(UTC) + timedelta(minutes=5)
    told = [subprocess.run([sys.executable, "-c", CHILD, str(Path(settings.paths.home) / "configs"), at.isoformat()],
                           env=env, capture_output=True, text=True, timeout=120, check=True).stdout.strip()
            for _ in range(2)]
    parent = build_clock(read_clock(sim.resolve(sim.stack.pid_dir)), wall=lambda: at).now()
    assert told == [parent.isoformat()] * 2, told
    assert parent - at > timedelta(hours=11), "simulated: the 5 wall minutes ahead are about 12 simulated hours"


def test_the_monitoring_window_ends_at_the_project_clocks_now_unless_given() -> None:
    from flows.monitoring import window_bounds

    clock = ManualClock(WALL + timedelta(days=3))
    assert window_bounds(None, 2.0, clock) == (WALL + timedelta(days=3, hours=-2), WALL + timedelta(days=3))
    clock.advance(timedelta(hours=6))
    assert window_bounds(None, 1.0, clock)[1] == WALL + timedelta(days=3, hours=6)
    assert window_bounds(WALL, 1.0, clock) == (WALL - timedelta(hours=1), WALL)


def test_the_timeline_is_in_project_time_beside_wall_seconds() -> None:
    from rich.console import Console

    from flows.demo import Timeline

    wall = ManualClock(WALL)
    clock = SimulatedClock(None, 600, wall=wall.now)
    timeline = Timeline(clock, wall=wall.now)
    wall.advance(timedelta(seconds=10))
    timeline.add("1. training", "v1 champion")
    wall.advance(timedelta(seconds=50))
    timeline.add("4. trigger", "drift decision: fire", at=WALL + timedelta(minutes=30))
    seen = timeline.seen()
    assert seen.simulated and seen.speed == 144
    assert seen.samples == ((WALL + timedelta(seconds=1440), WALL + timedelta(seconds=10)),
                            (WALL + timedelta(seconds=8640), WALL + timedelta(seconds=60)))
    console = Console(record=True, width=200)
    timeline.print(console)
    text = console.export_text()
    assert "simulated time (UTC)" in text and "144x wall time" in text
    assert text.index("12-02 10:24:00") < text.index("12-02 10:30:00"), "sorted by simulated time"
