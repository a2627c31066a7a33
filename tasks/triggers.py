"""Trigger tasks: decide a signal (recorded; emitted to the training deployment when it fires), send alarms.

The decision is the project's (flywheel/triggers.py, recorded by flywheel/trigger_decisions.py); Prefect
only carries out a fired one: the event `flywheel.retrain.requested`, about the resource
`flywheel.model.<name>`, is what the training deployment's trigger runs on. Its id is the decision's id,
so an event sent twice is dropped by Prefect's dedupe, and the automation's own events name it as their
triggering event, which is how `started_run` finds the training run a decision started.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from flywheel.monitoring.alarms import WindowVerdict
from flywheel.monitoring.performance import Estimate
from flywheel.monitoring.realized import WindowPerformance
from flywheel.notify import DeliveryResult, NotificationLog, notify
from flywheel.settings import NotifyConfig
from flywheel.trigger_decisions import TriggerDecisions
from flywheel.trigger_policy import Liveness, TriggerPolicy
from flywheel.triggers import RETRAIN_EVENT, TRAINING_SOURCE, Alarm, ChampionState, Decision, Signal, liveness_alarms
from tasks._prefect import in_run, retry_transient, run_logger

ACTION_EXECUTED = "prefect.automation.action.executed"  # the automation's event naming the run it started


def loop_pause(db_url: str, model: str) -> str | None:
    """Who paused the loop of `model`, when and why (`flywheel loop pause`); None while it runs."""
    from flywheel.loopcontrol import LoopControl

    control = LoopControl(db_url)
    try:
        return control.trigger_suppression(model)
    finally:
        control.dispose()


def prefect_api_configured() -> bool:
    """True when an event has somewhere to go: inside a run, or with an API configured. Outside both,
    emitting would start a throwaway ephemeral server whose automations die with this process."""
    if in_run():
        return True
    from prefect.settings import PREFECT_API_URL

    return bool(PREFECT_API_URL.value())


def retrain_event(decision: Decision) -> dict[str, Any]:
    """The event a fired decision emits (Prefect's event fields). `training_source` is in the payload only when
    the rule set one: the deployment trigger's template defaults a missing key to null (the dataset's own)."""
    source = decision.evidence.get(TRAINING_SOURCE)
    return {
        "id": uuid.UUID(decision.id),
        "event": RETRAIN_EVENT,
        # Prefect runs on wall time; the project's clock (maybe simulated) is in the payload
        "occurred": datetime.now(UTC),
        "resource": {"prefect.resource.id": f"flywheel.model.{decision.model}",
                     "prefect.resource.name": decision.model, "flywheel.model": decision.model},
        "payload": {"reason": decision.reason, "model": decision.model, "kind": decision.kind,
                    "decision_id": decision.id, "signal_event_id": decision.event_id,
                    "decided_at": decision.at.isoformat(), "evidence": decision.evidence,
                    **({TRAINING_SOURCE: source} if source else {})},
    }


def emit_retrain_event(decision: Decision) -> bool:
    """Send the fired decision's event and wait until the server took it; False (logged) when it could not."""
    log = run_logger("flywheel.triggers")
    if not prefect_api_configured():
        log.warning("decision %s fired, but no Prefect API is configured: %s not emitted", decision.id, RETRAIN_EVENT)
        return False
    from prefect.events import Event
    from prefect.events.clients import get_events_client
    from prefect.utilities.asyncutils import run_coro_as_sync

    event = Event(**retrain_event(decision))

    async def send() -> None:
        async with get_events_client() as client:
            await client.emit(event)

    try:
        run_coro_as_sync(send())
    except Exception as exc:  # recorded as fired without emitted_at: visible, and the caller is told
        log.error("decision %s fired, but %s could not be emitted: %s", decision.id, RETRAIN_EVENT, exc)
        return False
    return True


def render_decision(decision: Decision) -> str:
    """The decision as markdown (the Prefect artifact)."""
    verdict = "**fired**" if decision.fired else f"**suppressed** ({decision.suppressed_by})"
    lines = [
        f"# Trigger decision: {decision.model} {decision.kind}", "",
        f"{verdict}: {decision.reason}", "",
        "| field | value |", "|---|---|",
        f"| decision | `{decision.id}` |",
        f"| at (project clock) | {decision.at.isoformat(timespec='seconds')} |",
        f"| signal event | `{decision.event_id}` (occurred {decision.occurred.isoformat(timespec='seconds')}) |",
    ]
    if decision.fired:
        sent = decision.emitted_at.isoformat(timespec="seconds") if decision.emitted_at else "not emitted"
        lines.append(f"| event | `{RETRAIN_EVENT}` → training deployment: {sent} |")
    lines += ["", "## Evidence", "", "| key | value |", "|---|---|"]
    lines += [f"| {k} | {str(v).replace('|', '/')} |" for k, v in sorted(decision.evidence.items())]
    return "\n".join(lines) + "\n"


def decide_record_emit(signal: Signal, policy: TriggerPolicy, db_url: str, now: datetime,
                       paused: bool | str | None = None, last_retrain_at: datetime | None = None) -> Decision:
    """The one path from a signal to a training run: decide, record, emit when fired. `paused` None: ask the
    loop control (`flywheel loop pause`)."""
    store = TriggerDecisions(db_url)
    try:
        if paused is None:
            paused = (loop_pause(db_url, signal.model) or False) if signal.automatic else False
        decision = store.decide_and_record(signal, policy, paused, now, last_retrain_at)
        # a repeat of a signal whose fired decision never reached Prefect sends that decision's event again
        # (same id: should the first have arrived after all, Prefect drops the copy)
        unsent = [d for d in store.history(signal.model, signal.event_id).decisions
                  if d.event_id == signal.event_id and d.fired and d.emitted_at is None]
        for fired in unsent:
            if emit_retrain_event(fired):
                store.mark_emitted(fired.id)
        if decision.fired:
            decision = store.get(decision.id) or decision
    finally:
        store.dispose()
    log = run_logger("flywheel.triggers")
    log.info("trigger %s %s (%s): %s", signal.kind, signal.model, decision.outcome, decision.reason)
    if in_run():
        from prefect.artifacts import create_markdown_artifact

        create_markdown_artifact(
            markdown=render_decision(decision),
            key=f"trigger-{signal.model}".lower().replace("_", "-"),
            description=f"{signal.kind} for {signal.model}: {decision.outcome} ({decision.reason})"[:500],
        )
    return decision


# No task retries: a retry after the decision was recorded would record a duplicate of it (and re-send its
# event if it was not sent), and return that duplicate to the caller instead of the decision.
@task(name="decide_trigger", task_run_name="decide-{signal.kind}-{signal.model}", cache_policy=NO_CACHE)
def decide_trigger(signal: Signal, policy: TriggerPolicy, db_url: str, now: datetime, paused: bool | str | None = None,
                   last_retrain_at: datetime | None = None) -> Decision:
    """Decide a signal, record the decision (and its artifact), and emit the retrain event when it fires."""
    return decide_record_emit(signal, policy, db_url, now, paused, last_retrain_at)


def started_run(decision_id: str) -> str | None:
    """The flow run the decision's event started, once the training deployment's trigger acted on it."""
    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventNameFilter, EventRelatedFilter

    flt = EventFilter(event=EventNameFilter(name=[ACTION_EXECUTED]),
                      related=EventRelatedFilter(id=[f"prefect.event.{decision_id}"]))
    with get_client(sync_client=True) as client:
        events = client.read_events(filter=flt, limit=10).events  # server max is 50, client default 100
    for event in events:
        for related in event.related:
            if related.role == "flow-run":
                return related.id.removeprefix("prefect.flow-run.")
    return None


def link_started_run(decision_id: str, db_url: str, wait_s: float, poll_s: float = 0.5) -> str | None:
    """Wait up to `wait_s` for the run the decision started and record it on the decision; its id or None."""
    import time

    deadline = time.monotonic() + wait_s
    while True:
        try:
            run_id = started_run(decision_id)
        except Exception as exc:  # reading events is a courtesy: the decision and its event stand
            run_logger("flywheel.triggers").warning("could not look up the run of decision %s: %s", decision_id, exc)
            run_id = None
        if run_id or time.monotonic() >= deadline:
            break
        time.sleep(poll_s)
    if run_id:
        store = TriggerDecisions(db_url)
        try:
            store.link_run(decision_id, run_id)
        finally:
            store.dispose()
    return run_id


@task(name="link_decision_run", task_run_name="link-decision-{decision_id}", cache_policy=NO_CACHE)
def link_decision_run(decision_id: str, db_url: str) -> bool:
    """Record this flow run on the trigger decision that started it (once; False when already linked, or no
    such decision). A courtesy: a failure is logged, never fails the run."""
    from prefect.runtime import flow_run

    try:
        store = TriggerDecisions(db_url)
        try:
            return store.link_run(decision_id, str(flow_run.id))
        finally:
            store.dispose()
    except Exception as exc:
        run_logger("flywheel.triggers").warning("could not link decision %s to this run: %s", decision_id, exc)
        return False


@task(name="notify_alarm", task_run_name="notify-{alarm.kind}-{alarm.model}", cache_policy=NO_CACHE)
def notify_alarm(alarm: Alarm, cfg: NotifyConfig, db_url: str) -> list[DeliveryResult]:
    """Send an alarm to every configured target (signed, retried); failures are recorded, never raised."""
    log = run_logger("flywheel.notify")
    log.warning("alarm %s: %s", alarm.kind, alarm.summary)
    if not cfg.targets:
        return []
    try:
        deliveries: NotificationLog | None = NotificationLog(db_url)
    except Exception as exc:  # no record of it, but the alarm still goes out
        log.warning("notification log unavailable (%s): sending without recording", exc)
        deliveries = None
    try:
        return notify(alarm, cfg.targets, cfg, deliveries)
    finally:
        if deliveries is not None:
            deliveries.dispose()


@task(name="check_liveness", task_run_name="liveness-{model}", cache_policy=NO_CACHE)
def check_liveness(model: str, last_monitoring_at: datetime | None, last_outcome_at: datetime | None,
                   now: datetime, policy: Liveness, cfg: NotifyConfig, db_url: str,
                   watched_since: datetime | None = None) -> list[Alarm]:
    """A silent loop is an alarm too: raise and send the liveness alarms of `model`."""
    alarms = liveness_alarms(last_monitoring_at, last_outcome_at, now, policy, model=model,
                             watched_since=watched_since)
    for alarm in alarms:
        notify_alarm.fn(alarm, cfg, db_url)
    return alarms


@task(name="act_on_window", task_run_name="act-on-window-{model}", cache_policy=NO_CACHE)
def act_on_window(model: str, window_key: str, end: datetime, verdict: WindowVerdict, estimate: Estimate | None,
                  report: str | None, policy: TriggerPolicy, notify: NotifyConfig, db_url: str,
                  now: datetime, realized: WindowPerformance | None = None) -> list[Decision]:
    """Monitoring's verdict on one window, turned into trigger decisions (drift; performance, realized once
    enough of the window's outcomes arrived, else estimated) and alarms for people. A data-quality alarm is
    sent as itself and never triggers a retrain: bad data must not become a training set."""
    from flywheel.monitoring.realized import realized_reading
    from flywheel.triggers import alarm_for, alarm_id, drift_signal, performance_signal, pick_performance

    evidence = {"window": window_key, "drifted_features": list(verdict.drifted_features),
                "share_drifted": round(verdict.share_drifted, 4), "streak": verdict.streak, "report": report}
    drift_detail = ("data-quality alarm on this window: bad data never triggers a retrain"
                    if verdict.data_quality_alarm else "")
    signals = [drift_signal(verdict.alarm and not verdict.data_quality_alarm, model=model,
                            event_id=f"drift:{window_key}", occurred=end, evidence=evidence, detail=drift_detail)]
    rule = policy.rules.performance_degraded
    reading = pick_performance(realized_reading(realized), estimate, rule)
    if reading is not None and not verdict.data_quality_alarm:
        signals.append(performance_signal(reading, rule, model=model, event_id=f"performance:{window_key}",
                                          occurred=end))
    decisions = [decide_record_emit(s, policy, db_url, now) for s in signals]
    alarms = [a for s in signals if (a := alarm_for(s, report)) is not None]
    if verdict.data_quality_alarm:
        alarms.append(Alarm(id=alarm_id("data_quality", window_key), kind="data_quality", model=model,
                            summary=f"{model}: data-quality alarm: {'; '.join(verdict.data_quality_problems)[:300]}",
                            occurred=end, severity="critical", evidence=evidence, report_url=report))
    for alarm in alarms:
        notify_alarm.fn(alarm, notify, db_url)
    return decisions


@task(name="act_on_realized", task_run_name="act-on-realized-{model}", cache_policy=NO_CACHE)
def act_on_realized(model: str, updates: Sequence[WindowPerformance], skip_key: str, policy: TriggerPolicy,
                    notify: NotifyConfig, db_url: str, now: datetime) -> list[Decision]:
    """Earlier windows whose realized performance just filled in (their outcomes arrived late), each judged
    by the performance rule on its realized figure. Same event id as the window's estimate decision: a window
    whose estimate already fired is a duplicate, one whose estimate looked fine may fire now. `skip_key`:
    the current window, judged by act_on_window."""
    from flywheel.monitoring.realized import realized_reading
    from flywheel.triggers import alarm_for, performance_signal

    rule = policy.rules.performance_degraded
    decisions = []
    for u in updates:
        reading = realized_reading(u)
        if u.key == skip_key or reading is None:
            continue
        signal = performance_signal(reading, rule, model=model, event_id=f"performance:{u.key}",
                                    occurred=u.window_end)
        decisions.append(decide_record_emit(signal, policy, db_url, now))
        if (alarm := alarm_for(signal)) is not None:
            notify_alarm.fn(alarm, notify, db_url)
    return decisions


@task(name="read_champion_state", task_run_name="champion-state-{model}", cache_policy=NO_CACHE,
      retries=2, retry_delay_seconds=5, retry_condition_fn=retry_transient)
def read_champion_state(tracking_uri: str, db_url: str, dataset: str, model: str, version: str, now: datetime
                    ) -> ChampionState:
    """The champion's registration, the outcomes arrived since (and the latest), and when monitoring last
    judged a window: what the volume, staleness and liveness checks read."""
    from flywheel.audit import AuditLog
    from flywheel.monitoring.history import MonitoringHistory
    from flywheel.outcomes import OutcomeStore
    from flywheel.registry import Registry

    audit = AuditLog(db_url)
    try:
        # on the project clock, as `now` is: the first alias move to the version (its registration as
        # champion, challenger or queued); MLflow's creation time (wall) only for a version the log lacks
        registered = next((e.at for e in audit.entries(model) if e.to_version == str(version)), None)
        if registered is None:
            mv = Registry(tracking_uri, audit).model_version(model, version)
            registered = datetime.fromtimestamp(mv.creation_timestamp / 1000, UTC)
    finally:
        audit.dispose()
    registered = registered if registered.tzinfo else registered.replace(tzinfo=UTC)
    store = OutcomeStore(db_url)
    try:
        new_rows, last_outcome = store.arrivals(dataset, registered, now)
    finally:
        store.close()
    history = MonitoringHistory(db_url)
    try:
        last_judged = history.last_judged(model)
    finally:
        history.close()
    return ChampionState(model=model, version=str(version), registered_at=registered, new_labelled_rows=new_rows,
                     last_outcome_at=last_outcome, last_monitoring_at=last_judged)


@task(name="act_on_champion_state", task_run_name="act-on-champion-state-{state.model}", cache_policy=NO_CACHE)
def act_on_champion_state(state: ChampionState, policy: TriggerPolicy, notify: NotifyConfig, db_url: str, now: datetime
                      ) -> tuple[list[Decision], list[Alarm]]:
    """Volume and staleness as automatic trigger signals (dedupe, pause and cooldown apply; each decision
    recorded), and the liveness alarms of a silent loop (sent to people; a silence is sent once)."""
    from flywheel.triggers import loop_signals

    decisions = [decide_record_emit(s, policy, db_url, now) for s in loop_signals(state, policy, now)]
    alarms = check_liveness.fn(state.model, state.last_monitoring_at, state.last_outcome_at, now, policy.liveness,
                               notify, db_url, watched_since=state.registered_at)
    return decisions, alarms
