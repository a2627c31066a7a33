"""Rollout tasks: the plan, the target versions, the per-model lock, the service's routing, observation,
and the audited alias moves that end a rollout (promotion or rollback)."""

from __future__ import annotations

import os
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import httpx
from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from flywheel.clock import Clock, WallClock
from flywheel.locks import LockInfo, RolloutLocks
from flywheel.outcomes import read_outcomes
from flywheel.rollout import (
    ABReadout,
    ABTestPlan,
    GuardResult,
    Guards,
    Plan,
    RolloutDecision,
    RolloutError,
    ShadowPlan,
    StepReadout,
    ab_readout,
    count_failures,
    error_rate,
    evaluate_guards,
    load_plans,
    predict_request_counts,
    read_predictions,
    shadow_guards,
    split_arms,
)
from flywheel.schemas import DatasetDefinition
from flywheel.settings import RolloutConfig
from tasks._prefect import retry_transient, run_logger

STATUS_ROLLED_BACK = "rolled_back"
# how long the service may take to store a step's last prediction-log rows: a flush is one transaction of
# at most a few seconds of traffic, but the writer runs niced and yields to requests on a busy machine
LOG_ACK_TIMEOUT_S = 15.0


class SelectedPlan(BaseModel):
    name: str
    plan: Plan


class RolloutTarget(BaseModel):
    model: str
    champion: str
    challenger: str
    trigger: str | None = None  # why the challenger's training ran (its version's tag): may pick its plan


class ServiceClient:
    """The service's routing and admin endpoints (bearer token from the variable named in settings)."""

    def __init__(self, url: str, token_env: str, timeout: float = 30, need_token: bool = True) -> None:
        token = os.environ.get(token_env)
        if not token and need_token:
            raise RolloutError(f"the rollout needs the service's admin token: set the environment variable {token_env}")
        self.http = httpx.Client(base_url=url.rstrip("/"), timeout=timeout,
                                 headers={"Authorization": f"Bearer {token}"} if token else {})

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None,
              timeout: float | None = None) -> Any:
        try:
            r = self.http.request(method, path, json=body,
                                  timeout=self.http.timeout if timeout is None else httpx.Timeout(timeout))
        except httpx.TransportError as exc:
            raise ConnectionError(f"prediction service at {self.http.base_url} unreachable: {exc}") from exc
        if r.status_code in (401, 403):
            raise RolloutError(f"service refused {method} {path} ({r.status_code}): {r.text[:300]}")
        r.raise_for_status()
        return r.json() if "json" in r.headers.get("content-type", "") else r.text

    def routing(self) -> dict[str, Any]:
        return self._call("GET", "/routing")

    def set_routing(self, mode: str, share: float = 0.0, active: str = "champion") -> dict[str, Any]:
        return self._call("POST", "/admin/routing", {"mode": mode, "share": share, "active": active})

    def reload(self) -> dict[str, Any]:
        return self._call("POST", "/admin/reload")

    def metrics(self) -> str:
        return self._call("GET", "/metrics")

    def flush_log(self, timeout_s: float) -> dict[str, Any]:
        """Have the service store its queued prediction-log rows and wait for the writer's acknowledgement;
        RolloutError naming the service's reason when it does not come within `timeout_s`."""
        try:
            # the HTTP wait outlasts the service's own deadline, so its 504 (not a read timeout) reports it
            return self._call("POST", "/admin/flush-log", {"timeout_s": timeout_s}, timeout=timeout_s + 10)
        except httpx.HTTPStatusError as exc:
            if exc.response.status_code not in (503, 504):
                raise
            raise RolloutError(
                f"the service at {self.http.base_url} did not confirm its prediction log was stored "
                f"({exc.response.status_code}: {_detail(exc.response)}); a step is never judged on a partial log"
            ) from None

    def close(self) -> None:
        self.http.close()


def _detail(response: httpx.Response) -> str:
    try:
        return str(response.json().get("detail"))
    except ValueError:
        return response.text[:300]


def _registry(tracking_uri: str, audit_db_url: str, clock: Clock | None = None) -> Any:
    """The registry, its alias moves audited on `clock` (the project clock; default wall)."""
    from flywheel.audit import AuditLog
    from flywheel.registry import Registry

    return Registry(tracking_uri, AuditLog(audit_db_url, clock))


# ------------------------------------------------------------------------------------ plan, target


@task(task_run_name="load-rollout-plan-{name}", cache_policy=NO_CACHE)
def load_rollout_plan(plan_file: Path, name: str | None = None, trigger: str | None = None) -> SelectedPlan:
    """Read configs/rollout.yaml and pick the named plan; else the plan `by_trigger` gives the challenger's
    trigger (why its training ran); else the default."""
    plans = load_plans(plan_file)
    name = plans.plan_name_for(name, trigger)
    plan = plans.select(name)
    chosen = name if name in plans.plans else next(k for k, v in plans.plans.items() if v == plan)
    return SelectedPlan(name=chosen, plan=plan)


@task(task_run_name="resolve-rollout-target-{model}", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2,
      retry_condition_fn=retry_transient)
def resolve_rollout_target(tracking_uri: str, audit_db_url: str, model: str, challenger_version: str | None,
                           actor: str) -> RolloutTarget:
    """The champion and the challenger to roll out (a given version becomes the challenger, audited)."""
    registry = _registry(tracking_uri, audit_db_url)
    champion = registry.alias_version(model, "champion")
    if champion is None:
        raise RolloutError(f"model {model!r} has no champion: nothing to roll out against")
    if challenger_version is not None and registry.alias_version(model, "challenger") != str(challenger_version):
        registry.move_alias(model, "challenger", str(challenger_version), "chosen for a staged rollout", actor)
    challenger = registry.alias_version(model, "challenger")
    if challenger is None:
        raise RolloutError(f"model {model!r} has no challenger: train one, or pass challenger_version")
    from flywheel.registry import TAG_TRIGGER

    trigger = registry.version_tags(model, challenger).get(TAG_TRIGGER)
    return RolloutTarget(model=model, champion=champion, challenger=challenger, trigger=trigger)


# -------------------------------------------------------------------------------------------- lock


@task(task_run_name="acquire-rollout-lock-{model}", cache_policy=NO_CACHE)
def acquire_rollout_lock(audit_db_url: str, model: str, holder: str, lease_s: float) -> LockInfo:
    """Take the per-model rollout lock (RolloutLocked names the holder when it is taken)."""
    info = RolloutLocks(audit_db_url).acquire(model, holder, lease_s)
    if info.took_over_from:
        run_logger("flywheel.rollout").warning("took over the expired rollout lock of %s", info.took_over_from)
    return info


@task(task_run_name="renew-rollout-lock-{model}", cache_policy=NO_CACHE)
def renew_rollout_lock(audit_db_url: str, model: str, holder: str, lease_s: float) -> LockInfo:
    """Extend the lease before a step (LockLost if it expired and was taken over)."""
    return RolloutLocks(audit_db_url).renew(model, holder, lease_s)


@task(task_run_name="release-rollout-lock-{model}", cache_policy=NO_CACHE)
def release_rollout_lock(audit_db_url: str, model: str, holder: str) -> bool:
    """Drop the lock at the end of the rollout, whatever its outcome."""
    return RolloutLocks(audit_db_url).release(model, holder)


# ------------------------------------------------------------------ controls: supersede, loop, queue


@task(task_run_name="check-rollout-control-{model}", cache_policy=NO_CACHE)
def check_rollout_control(audit_db_url: str, model: str, holder: str) -> None:
    """Between steps: RolloutSuperseded when an operator superseded this rollout (`flywheel rollout supersede`)."""
    from flywheel.rollout_controls import RolloutControls

    RolloutControls(audit_db_url).check(model, holder)


@task(task_run_name="read-loop-state-{model}", cache_policy=NO_CACHE)
def read_loop_state(audit_db_url: str, model: str) -> Any:
    """Whether the model's loop is paused (`flywheel loop pause`), by whom and why (a LoopState)."""
    from flywheel.loopcontrol import LoopControl

    return LoopControl(audit_db_url).state(model)


def announce_release(registry: Any, model: str, done: Any, why: str) -> str | None:
    """Emit the registration event of a version a hand-off released (challenger-registered starts its rollout
    through the deployment's trigger); the event name when sent."""
    from tasks.register import EVENTS, emit_model_event

    if not done.released:
        return None
    mv = registry.model_version(model, done.released)
    return emit_model_event(
        EVENTS["champion" if done.alias == "champion" else "challenger"], model, done.released,
        {"version": done.released, "outcome": done.alias, "previous_champion": done.champion,
         "released_from_queue": True, "reason": done.reason, "why": why},
        related_run_id=mv.run_id)


def hand_off_and_announce(tracking_uri: str, audit_db_url: str, model: str, actor: str, why: str,
                          clock: Clock | None = None) -> dict[str, Any]:
    """The queue's hand-off (flywheel/challenger_queue.py) and the released version's event."""
    from flywheel.challenger_queue import hand_off
    from flywheel.loopcontrol import LoopControl

    registry = _registry(tracking_uri, audit_db_url, clock)
    done = hand_off(registry, RolloutLocks(audit_db_url), LoopControl(audit_db_url), model, actor, why)
    event = announce_release(registry, model, done, why)
    return {**done.model_dump(), "event": event}


@task(task_run_name="hand-off-queued-{model}", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2,
      retry_condition_fn=retry_transient)
def hand_off_queued(tracking_uri: str, audit_db_url: str, model: str, actor: str, why: str,
                    clock: Clock | None = None) -> dict[str, Any]:
    """After a rollout released its lock: the newest queued challenger takes the alias and its
    challenger-registered event starts its rollout; older ones are superseded, a stale one is kept out."""
    out = hand_off_and_announce(tracking_uri, audit_db_url, model, actor, why, clock)
    log = run_logger("flywheel.rollout")
    if out["released"]:
        log.info("queued v%s released to %s (%s); event %s", out["released"], out["alias"], why,
                 out["event"] or "not emitted")
    elif out["skipped"] != "nothing queued":
        log.info("queue not handed off: %s", out["skipped"])
    return out


# ----------------------------------------------------------------------------------------- service


@task(task_run_name="prepare-service", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2,
      retry_condition_fn=retry_transient)
def prepare_service(service_url: str, token_env: str, target: RolloutTarget) -> dict[str, Any]:
    """Reload the service's slots and check it serves exactly the target's champion and challenger."""
    client = ServiceClient(service_url, token_env)
    try:
        out = client.reload()
    finally:
        client.close()
    serving = out.get("serving") or {}
    refused = (out.get("refused") or {}).get("challenger")
    if serving.get("challenger") != target.challenger:
        why = f"; it refused it: {refused.get('reason')}" if refused else ""
        raise RolloutError(f"the service at {service_url} does not serve challenger v{target.challenger} "
                           f"(serving {serving}){why}")
    if serving.get("champion") != target.champion:
        raise RolloutError(f"the service serves champion v{serving.get('champion')}, the registry says "
                           f"v{target.champion}")
    return out


@task(task_run_name="route-traffic-{mode}-{share}", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=1,
      retry_condition_fn=retry_transient)
def route_traffic(service_url: str, token_env: str, mode: Literal["single", "canary", "shadow", "blue_green"],
                  share: float = 0.0, active: Literal["champion", "challenger"] = "champion") -> dict[str, Any]:
    """Set the service's routing policy."""
    client = ServiceClient(service_url, token_env)
    try:
        return client.set_routing(mode, share, active)
    finally:
        client.close()


@task(task_run_name="reload-service", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=1,
      retry_condition_fn=retry_transient)
def reload_service(service_url: str, token_env: str) -> dict[str, Any]:
    """Make the service re-read the aliases now (it would at its next registry poll anyway)."""
    client = ServiceClient(service_url, token_env)
    try:
        return client.reload()
    finally:
        client.close()


@task(task_run_name="observe-traffic-{step}", cache_policy=NO_CACHE)
def observe_traffic(
    step: str,
    policy: dict[str, Any],
    hold_s: float,
    service_url: str,
    token_env: str,
    log_url: str,
    outcomes_url: str,
    dataset: DatasetDefinition,
    target: RolloutTarget,
    guards: Guards,
    cfg: RolloutConfig,
    rollout_started: datetime,
    shadow: ShadowPlan | None = None,
    window_start: datetime | None = None,
    clock: Clock | None = None,
) -> StepReadout:
    """Hold the traffic for `hold_s` wall seconds, have the service store its prediction log, then judge the
    guards on what the log recorded (since `window_start` when a step is extended, else since this hold
    began), its window on `clock`, the project's (the log's `at` is on it; default: the wall clock)."""
    clock = clock or WallClock()
    client = ServiceClient(service_url, token_env)
    try:
        counts_before = predict_request_counts(client.metrics())
        started = clock.now()
        time.sleep(hold_s)
        ended = clock.now()
        counts_after = predict_request_counts(client.metrics())
        # every row of the window is stored before it is read (RolloutError when the writer does not ack)
        flushed = client.flush_log(LOG_ACK_TIMEOUT_S)
    finally:
        client.close()
    log = run_logger("flywheel.rollout")
    log.info("%s: prediction log stored (%s)", step, flushed)
    started = window_start or started
    champ, chall, results = _judge_window((started, ended), log_url, outcomes_url, dataset, target, guards, cfg,
                                          rollout_started, error_rate(counts_before, counts_after), shadow)
    readout = StepReadout(step=step, policy=policy, started_at=started, ended_at=ended,
                          champion_entities=int(champ["entity"].nunique()),
                          challenger_entities=int(chall["entity"].nunique()), guards=results)
    log.info("%s: %s", step, ", ".join(f"{g.name}={g.status}({g.value} vs {g.threshold})" for g in results))
    return readout


def _judge_window(span: tuple[datetime, datetime], log_url: str, outcomes_url: str, dataset: DatasetDefinition,
                  target: RolloutTarget, guards: Guards, cfg: RolloutConfig, rollout_started: datetime,
                  rate: float | None, shadow: ShadowPlan | None) -> tuple[Any, Any, list[GuardResult]]:
    """(champion reference rows, challenger rows, every guard) for the window `span`: its logged rows, the
    outcomes that arrived since the rollout began (joined to predictions only when they arrived after them),
    the error counts and the profile's latency ceiling (the plan's guards hold no ceiling)."""
    started, ended = span
    versions = [target.champion, target.challenger]
    window = read_predictions(log_url, target.model, versions, started, ended)
    # known by the window's end on the project clock (arrivals are on it, not on the wall's)
    outcomes = read_outcomes(outcomes_url, dataset, as_of=ended, arrived_since=rollout_started - timedelta(seconds=1))
    failed = count_failures(log_url, target.model, target.challenger, started, ended, shadow=shadow is not None)
    if shadow is not None:
        champ, chall = split_arms(window, target.champion, target.challenger, shadow=True)
        return champ, chall, shadow_guards(window, target.champion, target.challenger, shadow, outcomes, rate, failed,
                                           ceiling_ms=cfg.max_p99_latency_ms)
    champ_window, chall = split_arms(window, target.champion, target.challenger)
    # the distribution guards' reference is the champion's traffic over the whole rollout (at 100% it gets
    # none in a step); its latency where it answered too few requests in the window (100%, blue/green) is
    # taken from the window of the same length just before this one
    history = read_predictions(log_url, target.model, [target.champion], rollout_started - timedelta(seconds=1),
                               ended)
    champ, _ = split_arms(history, target.champion, target.challenger)
    earlier = read_predictions(log_url, target.model, versions, started - (ended - started), started)
    results = evaluate_guards(champ, chall, guards, outcomes, rate, failed, ceiling_ms=cfg.max_p99_latency_ms,
                              champion_window=champ_window, before=split_arms(earlier, *versions))
    return champ, chall, results


@task(task_run_name="read-ab-outcome", cache_policy=NO_CACHE)
def read_ab_outcome(log_url: str, outcomes_url: str, dataset: DatasetDefinition, target: RolloutTarget,
                    plan: ABTestPlan, since: datetime, now: datetime) -> ABReadout:
    """Per-arm outcome metric on the outcomes that arrived after the test's predictions (and by `now`, the
    project clock's), with a confidence interval on the difference."""
    rows = read_predictions(log_url, target.model, [target.champion, target.challenger], since)
    champ, chall = split_arms(rows, target.champion, target.challenger)
    outcomes = read_outcomes(outcomes_url, dataset, as_of=now, arrived_since=since)
    return ab_readout(champ, chall, outcomes, plan)


# ------------------------------------------------------------------------------------- alias moves


@task(task_run_name="promote-challenger-{target.challenger}", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2,
      retry_condition_fn=retry_transient)
def promote_challenger(tracking_uri: str, audit_db_url: str, target: RolloutTarget, reason: str, actor: str,
                       evidence: dict[str, Any], clock: Clock | None = None) -> int:
    """Challenger -> champion (the old champion is archived, the challenger alias cleared; all audited)."""
    registry = _registry(tracking_uri, audit_db_url, clock)
    if registry.alias_version(target.model, "champion") == target.challenger:
        return -1  # a retry after the move went through
    if registry.alias_version(target.model, "challenger") != target.challenger:
        raise RolloutError(f"the challenger alias of {target.model!r} no longer points at v{target.challenger} "
                           "(rollout aborted by hand?); not promoting")
    entry = registry.move_alias(target.model, "champion", target.challenger, reason, actor, evidence)
    return entry.id


@task(task_run_name="roll-back-challenger-{target.challenger}", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2,
      retry_condition_fn=retry_transient)
def rollback_challenger(tracking_uri: str, audit_db_url: str, target: RolloutTarget, reason: str, actor: str,
                        evidence: dict[str, Any], clock: Clock | None = None) -> int | None:
    """Keep the champion: drop the challenger alias (audited with the evidence) and tag it rolled back."""
    from flywheel.registry import TAG_STATUS

    registry = _registry(tracking_uri, audit_db_url, clock)
    entry = None
    if registry.alias_version(target.model, "challenger") == target.challenger:
        entry = registry.remove_alias(target.model, "challenger", reason, actor, evidence)
    if registry.alias_version(target.model, "champion") != target.challenger:
        registry.client.set_model_version_tag(target.model, target.challenger, TAG_STATUS, STATUS_ROLLED_BACK)
    return entry.id if entry else None


@task(task_run_name="publish-rollout-decision", cache_policy=NO_CACHE)
def publish_decision(decision: RolloutDecision) -> str | None:
    """The decision, its steps and guard values as a markdown artifact on the flow run."""
    from prefect.artifacts import create_markdown_artifact

    key = f"rollout-{decision.model}".lower().replace("_", "-")
    key = "".join(c for c in key if c.isalnum() or c == "-")
    artifact = create_markdown_artifact(markdown=decision.markdown(), key=key,
                                        description=f"{decision.outcome}: {decision.reason}"[:500])
    return str(artifact) if artifact else None


# ------------------------------------------------------------------------ operator actions (the CLI)


def _operator_clock(settings: Any) -> Clock:
    """A person's alias move is audited on the project clock: the running stack's, else the settings'."""
    from flywheel.stack import project_clock

    return project_clock(settings)


def rollout_status(settings: Any, model: str, entries: int = 5) -> dict[str, Any]:
    """Aliases, the service's routing (if it answers), the rollout lock, the last audit entries."""
    registry = _registry(settings.mlflow_tracking_uri, settings.audit_db_url)
    url = f"http://{settings.serve.host}:{settings.serve.port}"
    try:
        client = ServiceClient(url, settings.serve.admin_token_env, timeout=5, need_token=False)
        try:
            routing: Any = client.routing()
        finally:
            client.close()
    except (ConnectionError, httpx.HTTPError) as exc:
        routing = f"service not reachable at {url}: {exc}"
    from flywheel.challenger_queue import queued_versions
    from flywheel.loopcontrol import LoopControl

    lock = RolloutLocks(settings.audit_db_url).current(model)
    return {
        "model": model,
        "aliases": registry.aliases(model),
        "routing": routing,
        "lock": lock.model_dump(mode="json") if lock else None,
        "queued": [q.model_dump() for q in queued_versions(registry, model)],
        "loop": LoopControl(settings.audit_db_url).state(model).model_dump(mode="json"),
        "audit": [e.model_dump(mode="json") for e in registry.audit.entries(model)[-entries:]],
    }


def _tell_service(settings: Any, calls: list[tuple[str, dict[str, Any] | None]]) -> str:
    url = f"http://{settings.serve.host}:{settings.serve.port}"
    try:
        client = ServiceClient(url, settings.serve.admin_token_env, timeout=10)
    except RolloutError as exc:
        return f"service not told ({exc}); it picks the aliases up at its next registry poll"
    try:
        for path, body in calls:
            client._call("POST", path, body)
    except (ConnectionError, httpx.HTTPError, RolloutError) as exc:
        return f"service not told ({exc}); it picks the aliases up at its next registry poll"
    finally:
        client.close()
    return f"service at {url} reloaded, routing single"


def manual_promote(settings: Any, model: str, version: str | None, actor: str, reason: str) -> str:
    """Instant promotion (audited), under the rollout lock so it cannot cut into a running rollout."""
    registry = _registry(settings.mlflow_tracking_uri, settings.audit_db_url, _operator_clock(settings))
    version = version or registry.alias_version(model, "challenger")
    if version is None:
        raise RolloutError(f"model {model!r} has no challenger; pass --version")
    locks = RolloutLocks(settings.audit_db_url)
    locks.acquire(model, actor, lease_s=60)
    try:
        previous = registry.alias_version(model, "champion")
        registry.move_alias(model, "champion", str(version), reason, actor,
                            {"via": "flywheel rollout promote", "previous_champion": previous})
    finally:
        locks.release(model, actor)
    told = _tell_service(settings, [("/admin/reload", None),
                                    ("/admin/routing", {"mode": "single", "share": 0.0, "active": "champion"})])
    return f"{model} v{version} is champion (was v{previous}); {told}"


def manual_rollback(settings: Any, model: str, actor: str, reason: str, to_previous: bool = False) -> str:
    """Instant rollback: drop the challenger (abort a rollout) or, with `to_previous`, revert the last
    promotion (the champion alias goes back to the version it came from). Both audited."""
    from flywheel.registry import TAG_STATUS

    registry = _registry(settings.mlflow_tracking_uri, settings.audit_db_url, _operator_clock(settings))
    # traffic first: the champion answers everything before the aliases move
    told = _tell_service(settings, [("/admin/routing", {"mode": "single", "share": 0.0, "active": "champion"})])
    evidence = {"via": "flywheel rollout rollback", "aliases_before": registry.aliases(model)}
    if to_previous:
        moves = [e for e in registry.audit.entries(model, alias="champion") if e.to_version is not None]
        current = registry.alias_version(model, "champion")
        if not moves or moves[-1].to_version != current or moves[-1].from_version is None:
            raise RolloutError(f"no earlier champion of {model!r} to go back to (audit: {len(moves)} champion moves)")
        previous = moves[-1].from_version
        registry.move_alias(model, "champion", previous, reason, actor, evidence)
        registry.client.set_model_version_tag(model, str(current), TAG_STATUS, STATUS_ROLLED_BACK)
        result = f"champion back to v{previous} (v{current} rolled back)"
    else:
        challenger = registry.alias_version(model, "challenger")
        if challenger is None:
            raise RolloutError(f"model {model!r} has no challenger to roll back; use --to-previous to revert "
                               "the last promotion")
        registry.remove_alias(model, "challenger", reason, actor, evidence)
        registry.client.set_model_version_tag(model, challenger, TAG_STATUS, STATUS_ROLLED_BACK)
        result = f"challenger v{challenger} rolled back; champion v{registry.alias_version(model, 'champion')} kept"
    told = _tell_service(settings, [("/admin/reload", None)]) if "not told" not in told else told
    return f"{result}; {told}"


def manual_supersede(settings: Any, model: str, version: str | None, actor: str, reason: str) -> str:
    """Stop the rollout in flight and put a queued version (the newest, or `version`) in its challenger's place:
    the request the running flow checks between steps and the lock taken from it, traffic back to the champion,
    the running challenger dropped (tagged superseded), the version made challenger and its event emitted.
    Every step audited with `actor` and `reason`."""
    from flywheel.challenger_queue import claim_supersede, finish_supersede
    from flywheel.rollout_controls import RolloutControls

    registry = _registry(settings.mlflow_tracking_uri, settings.audit_db_url, _operator_clock(settings))
    locks = RolloutLocks(settings.audit_db_url)
    claim = claim_supersede(registry, locks, RolloutControls(settings.audit_db_url), model, version, actor, reason)
    # traffic first: the champion answers everything before the aliases move
    told = _tell_service(settings, [("/admin/routing", {"mode": "single", "share": 0.0, "active": "champion"})])
    if "not told" in told:  # the stopped rollout no longer drives the routing: never move a version under it
        done = finish_supersede(registry, locks, claim, actor, reason, traffic_on_champion=False)
        raise RolloutError(f"rollout of v{claim.running_challenger} stopped and its challenger dropped (with no "
                           f"challenger the service answers with the champion alone), but {told}: {done.skipped}; "
                           f"roll it out with `flywheel rollout start --version {claim.version}` once the service "
                           "answers")
    done = finish_supersede(registry, locks, claim, actor, reason)
    told = _tell_service(settings, [("/admin/reload", None)])
    event = announce_release(registry, model, done, f"supersede by {actor}")
    started = (f"event {event} emitted: the rollout deployment starts its rollout" if event else
               f"no Prefect API to emit its event to: `flywheel rollout start --version {done.released}` rolls it out")
    return (f"rollout of v{claim.running_challenger} ({claim.stopped_holder}) superseded; v{done.released} is "
            f"challenger" + (f", queued {', '.join('v' + v for v in done.superseded)} superseded"
                             if done.superseded else "") + f"; {told}; {started}")
