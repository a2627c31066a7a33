"""The challenger queue: a candidate that passes its gates while its model's rollout is in flight (or its
loop is paused) waits for the `challenger` alias instead of taking it.

Why: the service serves whatever the aliases say. Moving `challenger` during a canary swaps an unvetted
model into the canary's traffic while the rollout's guards still filter on the version they started
with, and the new challenger's own triggered rollout is then refused by the lock.

The rules (every step audited; the queue's entries and exits are rows of the alias audit log under the
pseudo-alias `queued`, see flywheel/registry.py):

- **Admission** (`admit`, at registration). Under the model's rollout lock, held for the decision only:
  a lock held by someone else and not expired means a rollout is in flight: the version is queued
  ("queued behind rollout of vN by <holder>"), no alias moves. A paused loop queues it too
  ("loop paused"). A version gated against a champion that is no longer the champion is stale (below).
  Otherwise it becomes challenger at once (champion when there is none), and older queued versions are
  superseded by it.
- **Hand-off** (`hand_off`, when a rollout ends, whatever its outcome, after it released its lock; when
  the loop is resumed; after a supersede). The newest queued version is released to `challenger` and
  the caller emits `flywheel.model.challenger-registered` for it, so the normal trigger starts its
  rollout; older queued versions are tagged superseded.
- **Staleness.** A queued version was gated against the champion of its time (tag
  `flywheel.gated_against`). If the champion changed meanwhile (typically: the rollout it waited behind
  promoted), its gate comparison no longer holds, and re-running the gates against the current champion
  is a training run's work, not a hand-off's. It is tagged `stale` and not rolled out; a person can still
  roll it out explicitly (`flywheel rollout start --version V`) or let the loop retrain.
- **Supersede** (`claim_supersede` + `finish_supersede`, `flywheel rollout supersede`): an explicit,
  audited command stops the running rollout (a request the flow checks between steps, and the lock taken
  from it), sends traffic back to the champion, drops the running challenger (tagged superseded) and
  puts the queued version in its place.

Layering: core only (registry, locks, loop control, controls); the tasks emit the Prefect events.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from flywheel.errors import FlywheelError
from flywheel.locks import LockInfo, LockLost, RolloutLocked, RolloutLocks
from flywheel.loopcontrol import LoopControl
from flywheel.registry import (
    CHALLENGER,
    CHAMPION,
    NO_CHAMPION,
    STATUS_QUEUED,
    STATUS_REJECTED,
    STATUS_STALE,
    STATUS_SUPERSEDED,
    TAG_GATED_AGAINST,
    TAG_STATUS,
    Registry,
)
from flywheel.rollout_controls import RolloutControls

FIRST_CHAMPION_REASON = "first model passed absolute gates"
CHALLENGER_REASON = "passed gates against the champion"
DECISION_LEASE_S = 60.0  # how long admission / hand-off / supersede may hold the rollout lock


class QueueError(FlywheelError):
    """A queue operation that cannot be done (nothing queued, no rollout to supersede, ...)."""


class QueuedVersion(BaseModel):
    model_config = ConfigDict(frozen=True)

    version: str
    gated_against: str | None  # the champion its gates compared it with; None: there was none


class ReleasePlan(BaseModel):
    """What a hand-off does with the queue: release one version, or find it stale; supersede the rest."""

    model_config = ConfigDict(frozen=True)

    release: str | None = None
    stale: str | None = None
    gated_against: str | None = None  # of the released or stale version
    superseded: list[str] = []


class Admission(BaseModel):
    """What registration did with a version that passed its gates."""

    outcome: Literal["champion", "challenger", "queued", "stale"]
    version: str
    reason: str
    champion: str | None  # the champion when the decision was made
    superseded: list[str] = []  # older queued versions this one replaced


class HandOff(BaseModel):
    """What a hand-off did: `released` got `alias` (the caller emits its event), or nothing moved (`skipped`)."""

    released: str | None = None
    alias: str | None = None
    champion: str | None = None
    reason: str | None = None
    stale: str | None = None
    superseded: list[str] = []
    skipped: str | None = None  # why nothing was released


class SupersedeClaim(BaseModel):
    """A running rollout stopped by `claim_supersede`: the lock is now `holder`'s."""

    model: str
    holder: str  # the supersede's own lock holder
    stopped_holder: str  # the rollout it took the lock from
    running_challenger: str | None
    version: str  # the version replacing the running challenger
    champion: str | None


# ------------------------------------------------------------------------------------ pure rules


def in_flight(lock: LockInfo | None, now: datetime | None = None) -> bool:
    """A rollout is in flight while its lock is held and its lease has not expired."""
    return lock is not None and lock.expires_at > (now or datetime.now(UTC))  # leases are on the wall clock


def is_stale(gated_against: str | None, champion: str | None) -> bool:
    """A version's gate comparison is stale once the champion it was gated against is no longer champion."""
    return gated_against != champion


def plan_release(queued: Sequence[QueuedVersion], champion: str | None) -> ReleasePlan:
    """The newest queued version is released (or is stale, when the champion changed since its gates);
    every older one is superseded by it either way."""
    if not queued:
        return ReleasePlan()
    ordered = sorted(queued, key=lambda q: int(q.version), reverse=True)
    newest, older = ordered[0], [q.version for q in ordered[1:]]
    if is_stale(newest.gated_against, champion):
        return ReleasePlan(stale=newest.version, gated_against=newest.gated_against, superseded=older)
    return ReleasePlan(release=newest.version, gated_against=newest.gated_against, superseded=older)


def stale_reason(gated_against: str | None, champion: str | None) -> str:
    return (f"stale: gated against champion {_v(gated_against)}, but the champion is now {_v(champion)}; "
            "not rolled out on a comparison that no longer holds (retrain, or roll it out explicitly with "
            "`flywheel rollout start --version V`)")


def _v(version: str | None) -> str:
    return f"v{version}" if version else "none"


def _gated_against(tags: dict[str, str]) -> str | None:
    value = tags.get(TAG_GATED_AGAINST)
    return None if value in (None, NO_CHAMPION) else value


def queued_versions(registry: Registry, model: str) -> list[QueuedVersion]:
    """The versions of `model` waiting in the queue, newest first."""
    return [QueuedVersion(version=str(mv.version), gated_against=_gated_against(dict(mv.tags or {})))
            for mv in registry.versions_with_status(model, STATUS_QUEUED)]


# ---------------------------------------------------------------------------------- admission


def admit(registry: Registry, locks: RolloutLocks, loop: LoopControl, model: str, version: str,
          gated_against: str | None, actor: str, evidence: dict[str, Any] | None = None,
          lease_s: float = DECISION_LEASE_S) -> Admission:
    """Decide, under the rollout lock, whether a version that passed its gates becomes challenger (or the
    first champion) now, is queued, or is stale; apply and audit the decision."""
    evidence = dict(evidence or {})
    holder = f"registration of {model} v{version} ({actor})"
    try:
        locks.acquire(model, holder, lease_s)
    except RolloutLocked as busy:
        running = registry.alias_version(model, CHALLENGER)
        reason = f"queued behind rollout of {_v(running)} by {busy.holder}"
        registry.enqueue(model, version, gated_against, reason, actor,
                         {**evidence, "rollout_holder": busy.holder, "running_challenger": running,
                          "lease_until": busy.expires_at.isoformat()})
        return Admission(outcome="queued", version=version, reason=reason,
                         champion=registry.alias_version(model, CHAMPION))
    try:
        champion = registry.alias_version(model, CHAMPION)
        state = loop.state(model)
        if state.paused:
            reason = f"queued: loop paused (by {state.actor}: {state.reason})"
            registry.enqueue(model, version, gated_against, reason, actor, {**evidence, "loop": state.model_dump(
                mode="json")})
            return Admission(outcome="queued", version=version, reason=reason, champion=champion)
        if is_stale(gated_against, champion):
            reason = stale_reason(gated_against, champion)
            registry.enqueue(model, version, gated_against, f"gated against champion {_v(gated_against)}, "
                             f"champion is now {_v(champion)}", actor, evidence)
            registry.dequeue(model, version, STATUS_STALE, reason, actor, evidence)
            return Admission(outcome="stale", version=version, reason=reason, champion=champion)
        if champion is None:
            registry.move_alias(model, CHAMPION, version, FIRST_CHAMPION_REASON, actor, evidence)
            outcome: Literal["champion", "challenger"] = "champion"
            reason = FIRST_CHAMPION_REASON
        else:
            reason = f"{CHALLENGER_REASON} v{champion}"
            registry.move_alias(model, CHALLENGER, version, reason, actor, evidence)
            outcome = "challenger"
        older = [q.version for q in queued_versions(registry, model) if int(q.version) < int(version)]
        for old in older:
            registry.dequeue(model, old, STATUS_SUPERSEDED, f"superseded by v{version}, which became {outcome} "
                             "directly (no rollout in flight)", actor, evidence)
        return Admission(outcome=outcome, version=version, reason=reason, champion=champion, superseded=older)
    finally:
        locks.release(model, holder)


# ------------------------------------------------------------------------------------ hand-off


def hand_off(registry: Registry, locks: RolloutLocks, loop: LoopControl, model: str, actor: str, why: str,
             lease_s: float = DECISION_LEASE_S) -> HandOff:
    """Release the newest queued version of `model` to challenger (champion when there is none), under the
    rollout lock; older queued versions are superseded, a stale newest one is tagged stale. Nothing moves
    while a rollout is in flight (its end hands off) or the loop is paused (resuming hands off)."""
    if not queued_versions(registry, model):
        return HandOff(skipped="nothing queued")
    holder = f"hand-off of {model} ({actor})"
    try:
        locks.acquire(model, holder, lease_s)
    except RolloutLocked as busy:
        return HandOff(skipped=f"a rollout is in flight ({busy.holder}); it hands off when it ends")
    try:
        return _hand_off_locked(registry, loop, model, actor, why)
    finally:
        locks.release(model, holder)


def _hand_off_locked(registry: Registry, loop: LoopControl, model: str, actor: str, why: str) -> HandOff:
    state = loop.state(model)
    if state.paused:
        return HandOff(skipped=f"loop paused (by {state.actor}: {state.reason}); resuming hands off")
    queued = queued_versions(registry, model)
    champion = registry.alias_version(model, CHAMPION)
    plan = plan_release(queued, champion)
    newest = plan.release or plan.stale
    evidence = {"why": why, "champion": champion, "queued": [q.version for q in queued]}
    for old in plan.superseded:
        registry.dequeue(model, old, STATUS_SUPERSEDED, f"superseded by queued v{newest} at the hand-off after "
                         f"{why}", actor, evidence)
    if plan.stale:
        registry.dequeue(model, plan.stale, STATUS_STALE, f"{stale_reason(plan.gated_against, champion)} "
                         f"(hand-off after {why})", actor, evidence)
        return HandOff(stale=plan.stale, champion=champion, superseded=plan.superseded,
                       skipped=f"newest queued v{plan.stale} is stale")
    assert plan.release is not None
    alias = CHAMPION if champion is None else CHALLENGER
    basis = FIRST_CHAMPION_REASON if champion is None else f"{CHALLENGER_REASON} v{champion}"
    reason = f"released from the queue after {why}: {basis}"
    registry.dequeue(model, plan.release, None, f"released to {alias} after {why}", actor, evidence)
    registry.move_alias(model, alias, plan.release, reason, actor, evidence)
    return HandOff(released=plan.release, alias=alias, champion=champion, reason=reason,
                   superseded=plan.superseded)


# ------------------------------------------------------------------------------------ supersede


def claim_supersede(registry: Registry, locks: RolloutLocks, controls: RolloutControls, model: str,
                    version: str | None, actor: str, reason: str, lease_s: float = DECISION_LEASE_S,
                    now: datetime | None = None) -> SupersedeClaim:
    """Stop the rollout in flight of `model`: take its lock (its next renewal fails), then record the request it
    checks between steps (it stops without touching traffic or aliases). Those are `finish_supersede`'s."""
    lock = locks.current(model)
    if not in_flight(lock, now):
        raise QueueError(f"no rollout of {model!r} is in flight (lock: "
                         f"{'expired, held by ' + lock.holder if lock else 'free'}); nothing to supersede"
                         + ("" if version else "; `flywheel rollout start --version V` rolls a version out"))
    assert lock is not None
    champion = registry.alias_version(model, CHAMPION)
    running = registry.alias_version(model, CHALLENGER)
    if version is None:
        queued = queued_versions(registry, model)
        if not queued:
            raise QueueError(f"nothing is queued for {model!r}: pass --version to supersede with a given version")
        version = queued[0].version
    version = str(version)
    tags = registry.version_tags(model, version)  # RegistryError when it does not exist
    if tags.get(TAG_STATUS) == STATUS_REJECTED:
        raise QueueError(f"{model} v{version} was rejected by its gates; it cannot supersede anything")
    if version in (champion, running):
        raise QueueError(f"{model} v{version} is already the {'champion' if version == champion else 'challenger'}")
    holder = f"supersede of {model} ({actor})"
    try:  # the lock first: a rollout that sees the request has lost its lock, so its end never hands off
        locks.take_over(model, lock.holder, holder, lease_s, f"superseded by {actor}: {reason}")
    except LockLost as exc:
        raise QueueError(f"the rollout of {model!r} ({lock.holder}) ended before it could be superseded; its end "
                         "handed the queue off (see `flywheel rollout status`)") from exc
    controls.request_supersede(model, lock.holder, version, actor, reason)
    return SupersedeClaim(model=model, holder=holder, stopped_holder=lock.holder, running_challenger=running,
                          version=version, champion=champion)


def finish_supersede(registry: Registry, locks: RolloutLocks, claim: SupersedeClaim, actor: str,
                     reason: str, traffic_on_champion: bool = True) -> HandOff:
    """With traffic back on the champion: drop the running challenger (tagged superseded, audited), put the
    chosen version in its place (audited), supersede older queued versions, release the lock.

    When the service could not be told to send all traffic to the champion, only the running challenger is
    dropped (with no challenger the service answers with the champion alone whatever its routing), and the
    version stays queued: moving it in could put it under the stopped rollout's canary share, unvetted."""
    model, version = claim.model, claim.version
    evidence = {"via": "flywheel rollout supersede", "stopped_rollout": claim.stopped_holder,
                "running_challenger": claim.running_challenger, "champion": claim.champion}
    try:
        if claim.running_challenger and registry.alias_version(model, CHALLENGER) == claim.running_challenger:
            registry.remove_alias(model, CHALLENGER, f"superseded by v{version} ({actor}): {reason}", actor,
                                  evidence)
            registry.set_status(model, claim.running_challenger, STATUS_SUPERSEDED)
        if not traffic_on_champion:
            return HandOff(champion=claim.champion, skipped=f"v{version} stays queued: the service's routing was "
                           "not confirmed on the champion")
        tags = registry.version_tags(model, version)
        gated = _gated_against(tags)
        note = "" if not is_stale(gated, claim.champion) else (
            f" (explicit: gated against champion {_v(gated)}, the champion is {_v(claim.champion)})")
        if tags.get(TAG_STATUS) in (STATUS_QUEUED, STATUS_STALE):
            registry.dequeue(model, version, None, f"released to challenger by supersede ({actor})", actor,
                             evidence)
        move_reason = f"supersede by {actor}: {reason}{note}"
        registry.move_alias(model, CHALLENGER, version, move_reason, actor, evidence)
        older = [q.version for q in queued_versions(registry, model) if int(q.version) < int(version)]
        for old in older:
            registry.dequeue(model, old, STATUS_SUPERSEDED, f"superseded by v{version} (supersede by {actor})",
                             actor, evidence)
        return HandOff(released=version, alias=CHALLENGER, champion=claim.champion, reason=move_reason,
                       superseded=older)
    finally:
        locks.release(model, claim.holder)
