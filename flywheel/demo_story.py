"""The story `flywheel demo` must prove, checked from what each of its steps observed.

1. the first model becomes **champion** (and the registry's `champion` alias points at it);
2. the next candidate becomes **challenger**, and the canary rollout its registration event starts on
   the stack ends `Promoted` with the `champion` alias moved to it;
3. the sabotaged candidate is **rejected** (its run ends `Rejected`) and no alias moves;
4. (with a stack) drifted traffic: the monitoring flow raises the drift alarm only after its persistence
   windows, the drift trigger fires exactly once and a later alarm is suppressed by the cooldown; the fired
   decision starts a training run that trains on the served features joined with their outcomes (the drift
   rule's `training_source`) and whose candidate the gates judge (challenger or rejected: both are valid),
   a challenger's rollout ends with a decision (Promoted or RolledBack); the labels of the drifted rows land
   late (outcome ingest) and a monitoring run fills in their windows' realized metric beside the estimate;
   a signed webhook retrain creates exactly one training run.

On a simulated clock (`make demo`): the demo's clock advanced at its speed, every drift decision was
taken at a simulated time inside the demo's, and the cooldown's suppression came within the cooldown of
the fire in simulated time (hours of it in seconds of wall time).

Pure: the demo gathers the observations (flows/demo.py), `check_story` judges them. A rollout that could
not happen because no stack runs is reported by `skipped_checks`, not as a failure: the stack is what
`make demo` starts first, and `flywheel demo` alone is allowed to be the smaller demo.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from itertools import pairwise
from typing import Literal

Outcome = Literal["champion", "challenger", "rejected"]
PROMOTED = "Promoted"  # the rollout flow's final state name on promotion (flows/rollout.py STATE_NAMES)
REJECTED = "Rejected"  # the training flow's final state name for a rejected candidate


@dataclass(frozen=True)
class TrainingSeen:
    """One training step: its result and the registry's aliases just before and just after it."""

    version: str
    outcome: Outcome
    state: str  # the training flow run's final state name (Completed, Rejected)
    failed_rules: tuple[str, ...] = ()
    aliases_before: Mapping[str, str] = field(default_factory=dict)
    aliases_after: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class RolloutSeen:
    """The rollout started by the challenger-registered event, as the demo saw it end (or not)."""

    state: str | None  # the run's final state name (Promoted, RolledBack, Held, Rejected, Failed, ...); None: none
    detail: str  # the final state's message, or why no final state was seen
    aliases_after: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class RolloutSkipped:
    """No rollout could run (no stack): why."""

    reason: str


@dataclass(frozen=True)
class DemoStory:
    first: TrainingSeen
    second: TrainingSeen
    # None: nothing to roll out (step 2 registered no challenger)
    rollout: RolloutSeen | RolloutSkipped | None
    sabotaged: TrainingSeen
    # step 4 (with a stack): None when not run at all (the three-step demo), Skipped with the reason
    lifecycle: LifecycleSeen | Skipped | None = None
    clock: ClockSeen | None = None  # the time the demo ran on (None: not observed)


@dataclass(frozen=True)
class ClockSeen:
    """The project's clock as the demo read it: one (project time, wall time) sample per timeline row, in the
    order they were taken."""

    simulated: bool
    speed: float  # simulated seconds per wall second (1 on the wall clock)
    samples: tuple[tuple[datetime, datetime], ...] = ()

    @property
    def span(self) -> tuple[datetime, datetime] | None:
        """(first, last) project time the demo read, or None without samples."""
        return (self.samples[0][0], self.samples[-1][0]) if self.samples else None


def check_story(story: DemoStory) -> list[str]:
    """One line per expected outcome that did not happen, each naming its step and the reason."""
    return [*_check_first(story.first), *_check_second(story.second, story.rollout),
            *_check_sabotaged(story.sabotaged), *check_lifecycle(story.lifecycle), *check_clock(story)]


SPEED_TOLERANCE = 0.2  # simulated time may run this share off its speed (the samples are two reads apart)


def check_clock(story: DemoStory) -> list[str]:
    """On a simulated clock: the clock advanced at its speed; step 4's drift decisions were taken at simulated
    times inside the demo's, and the cooldown's suppression within the cooldown of the fire, in simulated time."""
    seen = story.clock
    if seen is None or not seen.simulated or not seen.samples:
        return []
    failures = []
    sims = [sim for sim, _ in seen.samples]
    if len(sims) < 2 or sims[-1] <= sims[0] or any(b < a for a, b in pairwise(sims)):
        shown = ", ".join(f"{t:%m-%d %H:%M:%S}" for t in sims[:8])
        failures.append(f"clock: the simulated time did not advance from one timeline row to the next ({shown})")
    else:
        wall = (seen.samples[-1][1] - seen.samples[0][1]).total_seconds()
        ratio = (sims[-1] - sims[0]).total_seconds() / wall if wall > 0 else 0.0
        if wall >= 1 and abs(ratio - seen.speed) > SPEED_TOLERANCE * seen.speed:
            failures.append(f"clock: simulated time ran at x{ratio:.0f} of wall time, not at its speed "
                            f"x{seen.speed:g}")
    if isinstance(story.lifecycle, LifecycleSeen) and seen.span:
        failures += _check_simulated_decisions(story.lifecycle, seen.span)
    return failures


def _check_simulated_decisions(seen: LifecycleSeen, span: tuple[datetime, datetime]) -> list[str]:
    first, last = span
    failures = [f"step 4: drift decision {d.id[:8]} ({d.outcome}) was taken at {d.at:%Y-%m-%d %H:%M:%S}, outside "
                f"the demo's simulated time {first:%Y-%m-%d %H:%M:%S} - {last:%Y-%m-%d %H:%M:%S}: not on its clock"
                for d in seen.drift_decisions if d.at is not None and not first <= d.at <= last]
    fired = next((d for d in seen.drift_decisions if d.outcome == "fire"), None)
    cooled = [d for d in seen.drift_decisions if d.suppressed_by == "cooldown"]
    if fired is None or fired.at is None or not cooled or seen.cooldown is None:
        return failures  # no fire or no suppression: reported by _check_decisions
    for d in cooled:
        gap = (d.at - fired.at) if d.at is not None else None
        if gap is None or not timedelta(0) < gap < seen.cooldown:
            failures.append(f"step 4: the cooldown suppression {d.id[:8]} came "
                            f"{_hours(gap) if gap is not None else 'at no recorded time'} after the fire, not "
                            f"within the cooldown ({_hours(seen.cooldown)}) in simulated time")
    return failures


def _hours(delta: timedelta) -> str:
    return f"{delta.total_seconds() / 3600:.1f} h"


def cooldown_gap(seen: LifecycleSeen) -> timedelta | None:
    """The simulated time from the fired drift decision to the first one the cooldown suppressed."""
    fired = next((d for d in seen.drift_decisions if d.outcome == "fire"), None)
    cooled = next((d for d in seen.drift_decisions if d.suppressed_by == "cooldown"), None)
    if fired is None or cooled is None or fired.at is None or cooled.at is None:
        return None
    return cooled.at - fired.at


def skipped_checks(story: DemoStory) -> list[str]:
    """Checks that could not be made, each naming its step and why."""
    skipped = []
    if isinstance(story.rollout, RolloutSkipped) and story.second.outcome == "challenger":
        skipped.append(f"step 2: rollout of challenger v{story.second.version} skipped: {story.rollout.reason}")
    return [*skipped, *skipped_lifecycle(story.lifecycle)]


def _rules(failed: tuple[str, ...]) -> str:
    shown = ", ".join(failed[:4]) + (f" (+{len(failed) - 4} more)" if len(failed) > 4 else "")
    return shown or "no rule named"


def _alias(aliases: Mapping[str, str], name: str) -> str:
    version = aliases.get(name)
    return f"v{version}" if version else "unset"


def _check_first(seen: TrainingSeen) -> list[str]:
    v = f"v{seen.version}"
    if seen.outcome == "rejected":
        return [f"step 1: no champion: {v} rejected on {_rules(seen.failed_rules)}"]
    if seen.outcome == "challenger":
        return [f"step 1: no new champion: {v} became challenger of champion "
                f"{_alias(seen.aliases_before, 'champion')} (the demo expects a fresh home: `make clean`)"]
    if seen.aliases_after.get("champion") != seen.version:
        return [f"step 1: {v} was registered as champion, but the champion alias is "
                f"{_alias(seen.aliases_after, 'champion')}"]
    return []


def _check_second(seen: TrainingSeen, rollout: RolloutSeen | RolloutSkipped | None) -> list[str]:
    v = f"v{seen.version}"
    if seen.outcome == "rejected":
        return [f"step 2: no challenger: {v} rejected on {_rules(seen.failed_rules)}"]
    if seen.outcome == "champion":
        return [f"step 2: {v} became champion directly, not challenger (there was no champion to challenge)"]
    if seen.version not in (seen.aliases_after.get("challenger"), seen.aliases_after.get("champion")):
        # (champion already: a fast rollout may have promoted it before the training run returned)
        return [f"step 2: {v} was registered as challenger, but the challenger alias is "
                f"{_alias(seen.aliases_after, 'challenger')}"]
    if isinstance(rollout, RolloutSkipped):
        return []  # reported by skipped_checks
    if rollout is None:
        return [f"step 2: challenger {v} was registered but no rollout of it was observed"]
    if rollout.state is None:
        return [f"step 2: challenger {v} was not promoted: {rollout.detail}"]
    if rollout.state != PROMOTED:
        detail = f" ({rollout.detail})" if rollout.detail else ""
        return [f"step 2: challenger {v} was not promoted: rollout ended {rollout.state}{detail}"]
    if rollout.aliases_after.get("champion") != seen.version:
        return [f"step 2: the rollout ended {PROMOTED}, but the champion alias is "
                f"{_alias(rollout.aliases_after, 'champion')}, not {v}"]
    return []


def _check_sabotaged(seen: TrainingSeen) -> list[str]:
    v = f"v{seen.version}"
    failures = []
    if seen.outcome != "rejected":
        failures.append(f"step 3: the sabotaged {v} was not rejected: it became {seen.outcome}")
    elif seen.state != REJECTED:
        failures.append(f"step 3: the sabotaged {v} was rejected, but its run ended {seen.state}, not {REJECTED}")
    moved = _moves(seen.aliases_before, seen.aliases_after)
    if moved:
        failures.append(f"step 3: aliases moved while the sabotaged {v} was registered: {moved}")
    return failures


def _moves(before: Mapping[str, str], after: Mapping[str, str]) -> str:
    return ", ".join(f"{name} {_alias(before, name)} -> {_alias(after, name)}"
                     for name in sorted(set(before) | set(after)) if before.get(name) != after.get(name))


# ------------------------------------------------------------------------------------------ step 4: the lifecycle

FINAL_ROLLOUT = ("Promoted", "RolledBack")  # the rollout decided: the challenger promoted, or rolled back
GATED = ("challenger", "rejected")  # both are the gates' outcomes for a retrain under a champion
SERVED = "served_features"  # what the drift retrain trains on: the service's logged features with their outcomes


@dataclass(frozen=True)
class WindowSeen:
    """One monitoring window of the drifted traffic: what the monitoring flow judged."""

    rows: int
    status: str  # ok | drift | too_few_rows
    alarm: bool
    decisions: tuple[str, ...] = ()  # "<kind>: <outcome> (<reason>)"
    key: str = ""  # the window's key (flywheel.monitoring.history.window_key)
    end: datetime | None = None
    estimated_roc_auc: float | None = None  # the label-free estimate when it was judged


@dataclass(frozen=True)
class RealizedSeen:
    """A drifted window's realized performance, filled in after its labels landed late: beside the estimate."""

    window: int  # 1-based, as the demo numbered them
    scored_rows: int
    labelled_rows: int
    min_labelled_rows: int
    realized_roc_auc: float | None
    estimated_roc_auc: float | None  # the estimate on the same labelled rows
    roc_auc_error: float | None

    @property
    def realized(self) -> bool:
        return self.labelled_rows >= self.min_labelled_rows and self.realized_roc_auc is not None


@dataclass(frozen=True)
class DecisionSeen:
    """A drift trigger decision recorded during step 4 (flywheel_trigger_decisions)."""

    id: str
    outcome: str  # fire | suppressed
    suppressed_by: str | None
    reason: str
    flow_run_id: str | None = None
    at: datetime | None = None  # when it was decided (the project's clock)


@dataclass(frozen=True)
class RetrainSeen:
    """The training run the fired drift decision started on the stack, as the demo saw it end (or not)."""

    run_id: str | None  # None: no run was found for the decision
    state: str | None  # its final state name (Completed, Rejected, ...); None: not seen to end
    version: str | None
    outcome: str | None  # challenger | rejected | champion | queued | stale; None: unknown
    detail: str = ""
    # what it trained on (its MLflow run's flywheel.training_source / flywheel.training_rows); None: not read
    training_source: str | None = None
    training_rows: int | None = None


@dataclass(frozen=True)
class WebhookSeen:
    """The signed POST /hooks/retrain: the receiver's answer and the training runs it created."""

    status_code: int | None
    runs_created: int
    detail: str = ""


@dataclass(frozen=True)
class Skipped:
    """A part of step 4 that could not run: why."""

    reason: str


@dataclass(frozen=True)
class LifecycleSeen:
    """Step 4: drifted traffic judged window by window, the drift trigger, the retrain and its rollout,
    and a signed webhook retrain."""

    windows: tuple[WindowSeen, ...]
    drift_decisions: tuple[DecisionSeen, ...]
    retrain: RetrainSeen | None  # None: no decision fired, nothing to follow
    rollout: RolloutSeen | None  # None: the retrain registered no challenger
    webhook: WebhookSeen | Skipped
    # the drifted windows' evaluations after their labels landed late; Skipped: why no labels landed
    realized: tuple[RealizedSeen, ...] | Skipped = ()
    cooldown: timedelta | None = None  # the trigger policy's cooldown the decisions ran under


def check_lifecycle(seen: LifecycleSeen | Skipped | None) -> list[str]:
    """Step 4's expected outcomes that did not happen, one line each naming the step."""
    if seen is None or isinstance(seen, Skipped):
        return []  # not run (reported by skipped_lifecycle)
    return [*_check_alarm(seen.windows), *_check_decisions(seen.drift_decisions),
            *_check_retrain(seen.retrain, seen.rollout), *_check_realized(seen.realized),
            *_check_webhook(seen.webhook)]


def skipped_lifecycle(seen: LifecycleSeen | Skipped | None) -> list[str]:
    if isinstance(seen, Skipped):
        return [f"step 4: the lifecycle (drift -> monitoring -> trigger -> retrain -> rollout) skipped: {seen.reason}"]
    if isinstance(seen, LifecycleSeen) and isinstance(seen.webhook, Skipped):
        return [f"step 4: the signed webhook retrain skipped: {seen.webhook.reason}"]
    return []


def _check_alarm(windows: tuple[WindowSeen, ...]) -> list[str]:
    statuses = ", ".join(f"{w.status}{' (alarm)' if w.alarm else ''} on {w.rows} rows" for w in windows) or "none"
    alarmed = [i for i, w in enumerate(windows) if w.alarm]
    if not alarmed:
        return [f"step 4: no drift alarm raised in {len(windows)} monitoring windows of drifted traffic ({statuses})"]
    if alarmed[0] == 0:
        return [f"step 4: the drift alarm was raised on the first window, before the persistence windows ({statuses})"]
    return []


def _check_decisions(decisions: tuple[DecisionSeen, ...]) -> list[str]:
    fired = [d for d in decisions if d.outcome == "fire"]
    failures = []
    if len(fired) != 1:
        shown = "; ".join(f"{d.outcome}: {d.reason}" for d in decisions) or "no drift decision recorded"
        failures.append(f"step 4: expected exactly one fired drift decision, got {len(fired)} ({shown})")
    if not any(d.suppressed_by == "cooldown" for d in decisions):
        later = "; ".join(f"{d.outcome}: {d.reason}" for d in decisions if d.outcome != "fire") or "none"
        failures.append(f"step 4: no drift decision was suppressed by the cooldown (the others: {later})")
    return failures


def _check_retrain(retrain: RetrainSeen | None, rollout: RolloutSeen | None) -> list[str]:
    if retrain is None:
        return []  # no fired decision: reported by _check_decisions
    if retrain.run_id is None:
        return [f"step 4: the fired drift decision started no training run{_why(retrain.detail)}"]
    if retrain.state is None:
        return [f"step 4: the training run the trigger started was not seen to end{_why(retrain.detail)}"]
    if retrain.outcome not in GATED:
        return [f"step 4: the retrained candidate was not gated to challenger or rejected: run ended "
                f"{retrain.state}, outcome {retrain.outcome or 'unknown'}{_why(retrain.detail)}"]
    failures = []
    if retrain.training_source != SERVED:  # the drift rule (configs/triggers.yaml) asks for served features
        rows = f" ({retrain.training_rows} rows)" if retrain.training_rows is not None else ""
        failures.append(f"step 4: the drift retrain v{retrain.version} trained on "
                        f"{retrain.training_source or 'an unknown source'}{rows}, not on the served features "
                        "joined with their outcomes")
    if retrain.outcome != "challenger":
        return failures
    if rollout is None:
        return [*failures, f"step 4: challenger v{retrain.version} was registered but no rollout of it was observed"]
    if rollout.state not in FINAL_ROLLOUT:
        ended = f"rollout ended {rollout.state}" if rollout.state else "rollout not seen to end"
        return [*failures, f"step 4: no rollout decision on challenger v{retrain.version}: {ended}"
                           f"{_why(rollout.detail)}"]
    return failures


def _check_realized(realized: tuple[RealizedSeen, ...] | Skipped) -> list[str]:
    if isinstance(realized, Skipped):
        return [f"step 4: no realized metric beside the estimate: {realized.reason}"]
    if not any(r.realized for r in realized):
        shown = "; ".join(f"window {r.window}: {r.labelled_rows} of {r.scored_rows} rows labelled (realized from "
                          f"{r.min_labelled_rows})" for r in realized) or "no drifted window was evaluated"
        return [f"step 4: the late labels filled in no realized metric beside the estimate ({shown})"]
    return []


def _check_webhook(webhook: WebhookSeen | Skipped) -> list[str]:
    if isinstance(webhook, Skipped):
        return []  # reported by skipped_lifecycle
    if webhook.status_code != 202:
        return [f"step 4: the signed webhook retrain was not accepted: HTTP {webhook.status_code}"
                f"{_why(webhook.detail)}"]
    if webhook.runs_created != 1:
        return [f"step 4: the signed webhook retrain created {webhook.runs_created} training runs, not 1"
                f"{_why(webhook.detail)}"]
    return []


def _why(detail: str) -> str:
    return f" ({detail})" if detail else ""
