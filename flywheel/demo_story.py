"""The story `flywheel demo` must prove, checked from what each of its steps observed.

1. the first model becomes **champion** (and the registry's `champion` alias points at it);
2. the next candidate becomes **challenger**, and the canary rollout its registration event starts on
   the stack ends `Promoted` with the `champion` alias moved to it;
3. the sabotaged candidate is **rejected** (its run ends `Rejected`) and no alias moves.

Pure: the demo gathers the observations (flows/demo.py), `check_story` judges them. A rollout that could
not happen because no stack runs is reported by `skipped_checks`, not as a failure: the stack is what
`make demo` starts first, and `flywheel demo` alone is allowed to be the smaller demo.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
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


def check_story(story: DemoStory) -> list[str]:
    """One line per expected outcome that did not happen, each naming its step and the reason."""
    return [*_check_first(story.first), *_check_second(story.second, story.rollout),
            *_check_sabotaged(story.sabotaged)]


def skipped_checks(story: DemoStory) -> list[str]:
    """Checks that could not be made, each naming its step and why."""
    if isinstance(story.rollout, RolloutSkipped) and story.second.outcome == "challenger":
        return [f"step 2: rollout of challenger v{story.second.version} skipped: {story.rollout.reason}"]
    return []


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
