"""The staged rollout of a challenger: lock -> route -> observe & judge -> (approve) -> promote or roll back.

It reads as a story; every step is a task in tasks/rollout.py, every rule in flywheel/rollout.py.
The run ends in a named state: `Promoted`, `RolledBack`, `Held` or `Rejected` (approval refused or timed
out), each with a markdown artifact explaining the decision. A second rollout of the same model while
one runs fails at once with the holder's name (RolloutLocked).

When it ends, whatever the outcome, and once it has released its lock, the challenger queue is handed off:
a candidate registered meanwhile waited (queued) instead of moving the alias under this rollout, and the
newest one now becomes challenger (flywheel/challenger_queue.py). Between steps it checks for an operator's
`flywheel rollout supersede`: superseded, it ends `Superseded` (a Cancelled state) without touching traffic
or aliases, which the command already handed to the next challenger. While the model's loop is paused
(`flywheel loop pause`) it does not promote: it ends `Held`, "loop paused".
"""

from __future__ import annotations

import time
from typing import Any, Literal

from prefect import flow, get_run_logger
from prefect.input import RunInput
from prefect.states import Cancelled, Completed, State
from pydantic import BaseModel, Field

from flywheel.locks import LockLost
from flywheel.rollout import (
    ABTestPlan,
    BlueGreenPlan,
    CanaryPlan,
    RolloutDecision,
    ShadowPlan,
    StepReadout,
    ab_next,
    canary_next,
    failure_reason,
    gradual_shares,
    judge_step,
)
from flywheel.rollout_controls import RolloutSuperseded
from flywheel.runsummary import RunSummary, mlflow_version_url
from tasks.rollout import (
    RolloutTarget,
    SelectedPlan,
    acquire_rollout_lock,
    check_rollout_control,
    hand_off_queued,
    load_rollout_plan,
    observe_traffic,
    prepare_service,
    promote_challenger,
    publish_decision,
    read_ab_outcome,
    read_loop_state,
    release_rollout_lock,
    reload_service,
    renew_rollout_lock,
    resolve_rollout_target,
    rollback_challenger,
    route_traffic,
)
from tasks.summary import publish_run_summary

STATE_NAMES = {"promoted": "Promoted", "rolled_back": "RolledBack", "held": "Held", "rejected": "Rejected"}
# emitted about the challenger version when the rollout ends, so the loop can be followed in the event feed
EVENTS = {"promoted": "flywheel.model.promoted", "rolled_back": "flywheel.model.rolled-back",
          "held": "flywheel.model.rollout-held", "rejected": "flywheel.model.rollout-rejected",
          "superseded": "flywheel.model.rollout-superseded"}


class RolloutParams(BaseModel):
    """What the Prefect UI shows as the run form."""

    model_name: str | None = Field(None, description="Registered model (default: serve/register model name)")
    challenger_version: str | None = Field(None, description="Version to roll out (default: the `challenger` alias)")
    strategy: str | None = Field(None, description="Plan name in the rollout plan file (default: its `default`)")
    service_url: str | None = Field(None, description="Prediction service (default: http://serve.host:serve.port)")
    approval_required: bool | None = Field(None, description="Override rollout.approval_required")
    approval_timeout_s: float | None = Field(None, gt=0, description="Override rollout.approval_timeout_s")
    profile: Literal["local", "ci", "production"] | None = Field(None, description="Settings profile")
    config_dir: str | None = Field(None, description="Folder holding base.yaml (default: ./configs)")


class ApprovalInput(RunInput):
    """The form a person answers in the Prefect UI before full promotion."""

    approve: bool = Field(False, description="Promote the challenger to champion")
    comment: str = Field("", description="Why (recorded in the audit log)")


class _Run:
    """What every step of one rollout needs (built once from the settings)."""

    def __init__(self, params: RolloutParams) -> None:
        from flywheel.clock import build_clock
        from flywheel.runtime import start_run_context

        ctx = start_run_context(params.profile, params.config_dir)
        s = ctx.settings
        self.params, self.ctx = params, ctx
        self.model = params.model_name or s.serve.model_name or ctx.model_name
        self.url = params.service_url or f"http://{s.serve.host}:{s.serve.port}"
        self.token_env = s.serve.admin_token_env
        self.log_url = s.store_url(s.serve.prediction_log_url)
        self.outcomes_url = ctx.audit_db_url  # flywheel_outcomes: delayed labels, joined to the predictions
        self.cfg = s.rollout
        self.approval = self.cfg.approval_required if params.approval_required is None else params.approval_required
        self.approval_timeout = params.approval_timeout_s or self.cfg.approval_timeout_s
        self.actor = ctx.actor()
        # the guards read the prediction log and the outcomes by the project's time (holds stay wall seconds)
        self.clock = build_clock(s.clock)
        self.started = self.clock.now()

    def check(self) -> None:
        """RolloutSuperseded when an operator superseded this rollout: checked before every routing change,
        every hold, and the promotion or rollback."""
        check_rollout_control(self.ctx.audit_db_url, self.model, self.actor)

    def route(self, mode: Any, share: float = 0.0, active: Any = "champion") -> dict[str, Any]:
        self.check()
        return route_traffic(self.url, self.token_env, mode, share, active)

    def observe(self, step: str, policy: dict[str, Any], hold_s: float, target: RolloutTarget, plan: Any,
                shadow: ShadowPlan | None = None) -> StepReadout:
        """Hold and judge; a step with too little traffic to judge is held again (up to max_extensions)."""
        readout: StepReadout | None = None
        for extension in range(plan.guards.max_extensions + 1):
            self.check()
            renew_rollout_lock(self.ctx.audit_db_url, self.model, self.actor, self.cfg.lock_lease_s + hold_s)
            readout = observe_traffic(
                step if extension == 0 else f"{step} (extended x{extension})", policy, hold_s, self.url,
                self.token_env, self.log_url, self.outcomes_url, self.ctx.dataset, target, plan.guards, self.cfg,
                self.started, shadow, readout.started_at if readout else None, self.clock)
            if judge_step(readout, plan.guards, extension) != "extend":
                break
        assert readout is not None
        return readout


@flow(name="rollout", log_prints=True)
def rollout(params: RolloutParams | None = None) -> RolloutDecision | State[Any]:
    """Roll the challenger out by the configured plan; promote it, or roll it back with the evidence."""
    params = params or RolloutParams()
    run = _Run(params)
    selected = _load_plan(run)
    # the lock first: a refused rollout must not touch the aliases of the one in progress
    acquire_rollout_lock(run.ctx.audit_db_url, run.model, run.actor, run.cfg.lock_lease_s)
    target: RolloutTarget | None = None
    ended = "failed"
    try:
        target = resolve_rollout_target(run.ctx.tracking_uri, run.ctx.audit_db_url, run.model,
                                        params.challenger_version, run.actor)
        selected = _load_plan(run, target.trigger)  # why it was trained may pick its plan (by_trigger)
        prepare_service(run.url, run.token_env, target)
        plan = selected.plan
        if isinstance(plan, CanaryPlan):
            decision = _canary(run, selected.name, plan, target)
        elif isinstance(plan, BlueGreenPlan):
            decision = _blue_green(run, selected.name, plan, target)
        elif isinstance(plan, ShadowPlan):
            decision = _shadow(run, selected.name, plan, target)
        else:
            decision = _ab_test(run, selected.name, plan, target)
        ended = decision.outcome
    except (RolloutSuperseded, LockLost) as stopped:
        superseded = stopped if isinstance(stopped, RolloutSuperseded) else _superseded_by(run)
        if superseded is None:
            raise  # the lease ran out and another rollout took the lock: its service, its traffic
        # the supersede command routes traffic to the champion and moves the aliases: touch neither
        get_run_logger().warning("%s", superseded)
        _summarize(run, "superseded", target.challenger if target else params.challenger_version, str(superseded),
                   target.champion if target else None)
        return Cancelled(name="Superseded", message=str(superseded))
    except BaseException:
        # a crash mid-rollout must not leave the challenger answering: back to the champion alone
        if target is not None:
            get_run_logger().error("rollout failed; routing all traffic back to champion v%s", target.champion)
            try:
                route_traffic.fn(run.url, run.token_env, "single")
            except Exception as exc:
                get_run_logger().error("could not reset the routing: %s", exc)
        raise
    finally:
        released = release_rollout_lock(run.ctx.audit_db_url, run.model, run.actor)
        if released:  # not when superseded or the lease was lost: the lock's new holder owns the queue
            _hand_off(run, f"rollout of v{target.challenger if target else '?'} ended ({ended})")
    publish_decision(decision)
    summary = _summarize(run, decision.outcome, decision.challenger, decision.reason, decision.champion,
                         [f"plan **{decision.plan}** (`{decision.strategy}`), {len(decision.steps)} step(s); "
                          f"the `rollout-{decision.model}` artifact has each step's guards"])
    return Completed(name=STATE_NAMES[decision.outcome], message=f"{summary.title}: {decision.reason}",
                     data=decision)


def _summarize(run: _Run, outcome: str, version: str | None, reason: str, champion: str | None,
               details: list[str] | None = None) -> RunSummary:
    """Name and tag the run by its outcome (`churn-v3-rolled-back`, `outcome:rolled-back`), attach the summary
    and emit the outcome's event (flywheel.model.promoted / rolled-back / ...) for the event feed."""
    ui = run.ctx.settings.mlflow_ui_url
    summary = RunSummary(flow="rollout", model=run.model, version=version, outcome=outcome, verdict=reason,
                         champion=champion, details=details or [],
                         mlflow_version_url=mlflow_version_url(ui, run.model, version) if version else None)
    return publish_run_summary(summary, event=EVENTS.get(outcome), payload={"champion": champion})


def _superseded_by(run: _Run) -> RolloutSuperseded | None:
    """The supersede request that took this rollout's lock, if that is how it was lost."""
    from flywheel.rollout_controls import RolloutControls

    request = RolloutControls(run.ctx.audit_db_url).pending(run.model, run.actor)
    return RolloutSuperseded(request) if request else None


def _hand_off(run: _Run, why: str) -> None:
    """The queue's hand-off after this rollout; its failure is logged, never raised over the rollout's end."""
    try:
        hand_off_queued(run.ctx.tracking_uri, run.ctx.audit_db_url, run.model, run.actor, why, run.clock)
    except Exception as exc:
        get_run_logger().error("could not hand the challenger queue off after %s: %s", why, exc)


def _load_plan(run: _Run, trigger: str | None = None) -> SelectedPlan:
    """The plan: `strategy` given to the run, else rollout.strategy, else by the challenger's trigger, else the
    file's default. Loaded once before the lock too, so a bad plan file fails before anything moves."""
    return load_rollout_plan(run.ctx.settings.resolve(run.cfg.plan_file), run.params.strategy or run.cfg.strategy,
                             trigger)


# ------------------------------------------------------------------------------------- strategies


def _canary(run: _Run, name: str, plan: CanaryPlan, target: RolloutTarget) -> RolloutDecision:
    steps: list[StepReadout] = []
    for i, step in enumerate(plan.steps):
        run.route("canary", step.share)
        readout = run.observe(f"step {i + 1}/{len(plan.steps)}: canary {step.share:.0%}",
                              {"mode": "canary", "share": step.share}, step.hold_s, target, plan)
        steps.append(readout)
        if canary_next(plan, i, readout, plan.guards.max_extensions) == "rollback":
            path = gradual_shares(step.share, plan) if plan.rollback == "gradual" else []
            for share in path:  # ramp down through the lower steps, holding each
                run.route("canary", share)
                time.sleep(plan.rollback_hold_s if share > 0 else 0)
            return _roll_back(run, name, plan, target, steps, _breach_reason(readout), rollback_path=path)
    return _promote(run, name, plan, target, steps, f"passed {len(steps)} canary step(s) without a guard breach")


def _blue_green(run: _Run, name: str, plan: BlueGreenPlan, target: RolloutTarget) -> RolloutDecision:
    run.route("blue_green", active="challenger")  # instant switch; the champion slot stays loaded
    readout = run.observe("green: challenger answers all traffic", {"mode": "blue_green", "active": "challenger"},
                          plan.hold_s, target, plan)
    if judge_step(readout, plan.guards, plan.guards.max_extensions) == "breach":
        run.route("blue_green", active="champion")  # the warm slot takes the traffic back at once
        return _roll_back(run, name, plan, target, [readout], _breach_reason(readout))
    return _promote(run, name, plan, target, [readout], "green slot held without a guard breach")


def _shadow(run: _Run, name: str, plan: ShadowPlan, target: RolloutTarget) -> RolloutDecision:
    run.route("shadow", plan.sample)
    readout = run.observe(f"shadow {plan.sample:.0%}", {"mode": "shadow", "share": plan.sample}, plan.duration_s,
                          target, plan, shadow=plan)
    if judge_step(readout, plan.guards, plan.guards.max_extensions) == "breach":
        return _roll_back(run, name, plan, target, [readout], _breach_reason(readout))
    if plan.on_pass == "promote":
        return _promote(run, name, plan, target, [readout], "shadow comparison passed")
    run.route("single")
    return _decide(run, name, plan, target, "held", "shadow comparison passed; promotion left to a person",
                   [readout])


def _ab_test(run: _Run, name: str, plan: ABTestPlan, target: RolloutTarget) -> RolloutDecision:
    run.route("canary", plan.share)  # a fixed, sticky split for the whole test
    readout = run.observe(f"A/B split {plan.share:.0%}", {"mode": "canary", "share": plan.share}, plan.duration_s,
                          target, plan)
    # the split's own traffic: before it the champion answered every entity, which would put them in both arms
    ab = read_ab_outcome(run.log_url, run.outcomes_url, run.ctx.dataset, target, plan, readout.started_at,
                         run.clock.now())
    action = ab_next(plan, ab, judge_step(readout, plan.guards, plan.guards.max_extensions) == "breach")
    if action == "promote":
        return _promote(run, name, plan, target, [readout], ab.detail, ab=ab)
    if action == "rollback":
        return _roll_back(run, name, plan, target, [readout],
                          _breach_reason(readout) if readout.breaches else ab.detail, ab=ab)
    run.route("single")
    return _decide(run, name, plan, target, "held", f"inconclusive: {ab.detail}", [readout], ab=ab)


# --------------------------------------------------------------------------------------- endings


def _breach_reason(readout: StepReadout) -> str:
    return failure_reason(readout)


def _decide(run: _Run, name: str, plan: Any, target: RolloutTarget, outcome: Any, reason: str,
            steps: list[StepReadout], **extra: Any) -> RolloutDecision:
    return RolloutDecision(model=run.model, plan=name, strategy=plan.strategy, champion=target.champion,
                           challenger=target.challenger, outcome=outcome, reason=reason, steps=steps,
                           decided_at=run.clock.now(), **extra)


def _roll_back(run: _Run, name: str, plan: Any, target: RolloutTarget, steps: list[StepReadout], reason: str,
               outcome: Literal["rolled_back", "rejected"] = "rolled_back", **extra: Any) -> RolloutDecision:
    run.check()
    decision = _decide(run, name, plan, target, outcome, reason, steps, **extra)
    run.route("single")  # instant: the champion answers everything before anything else happens
    rollback_challenger(run.ctx.tracking_uri, run.ctx.audit_db_url, target, f"rollout {outcome}: {reason}",
                        run.actor, decision.evidence(), run.clock)
    reload_service(run.url, run.token_env)
    return decision


def _promote(run: _Run, name: str, plan: Any, target: RolloutTarget, steps: list[StepReadout], reason: str,
             **extra: Any) -> RolloutDecision:
    loop = read_loop_state(run.ctx.audit_db_url, run.model)
    if loop.paused:  # nothing promotes automatically while the loop is paused; `flywheel rollout promote` still does
        run.route("single")
        return _decide(run, name, plan, target, "held", f"loop paused: {reason}, but promotion is left to a person "
                       f"(`flywheel rollout promote`); {loop.describe()}", steps, **extra)
    approval = _ask_approval(run, target, steps, reason) if run.approval else None
    if approval is not None and not approval["approve"]:
        return _roll_back(run, name, plan, target, steps, f"approval {approval['verdict']}: {approval['comment']}",
                          outcome="rejected", approval=approval, **extra)
    run.check()  # a supersede during the approval wait wins over the answer
    decision = _decide(run, name, plan, target, "promoted", reason, steps, approval=approval, **extra)
    promote_challenger(run.ctx.tracking_uri, run.ctx.audit_db_url, target, f"staged rollout ({name}): {reason}",
                       run.actor, decision.evidence(), run.clock)
    reload_service(run.url, run.token_env)
    run.route("single")
    return decision


def _ask_approval(run: _Run, target: RolloutTarget, steps: list[StepReadout], reason: str) -> dict[str, Any]:
    """Pause for a person's answer in the Prefect UI; no answer before the timeout is a rejection."""
    from prefect import pause_flow_run
    from prefect.exceptions import FlowPauseTimeout

    logger = get_run_logger()
    summary = "\n".join(f"- {s.step}: " + ", ".join(f"{g.name} {g.status} ({g.value})" for g in s.guards)
                        for s in steps)
    description = (f"Promote **{run.model} v{target.challenger}** over champion v{target.champion}?\n\n"
                   f"{reason}\n\n{summary}")
    logger.info("waiting up to %ss for approval in the Prefect UI", run.approval_timeout)
    # the lock must outlive the wait
    renew_rollout_lock(run.ctx.audit_db_url, run.model, run.actor, run.cfg.lock_lease_s + run.approval_timeout)
    timeout = int(max(1, round(run.approval_timeout)))
    try:
        answer = pause_flow_run(wait_for_input=ApprovalInput.with_initial_data(description=description),
                                timeout=timeout, poll_interval=max(1, min(10, timeout // 10)))
    except FlowPauseTimeout:
        _resume_after_timeout()
        return {"approve": False, "verdict": "timed out", "comment": f"no answer within {timeout}s"}
    return {"approve": bool(answer.approve), "verdict": "approved" if answer.approve else "rejected",
            "comment": answer.comment}


def _resume_after_timeout() -> None:
    """The run stays Paused after a pause times out: set it Running so the rollback tasks can run."""
    from prefect.client.orchestration import get_client
    from prefect.runtime import flow_run
    from prefect.states import Running

    with get_client(sync_client=True) as client:
        client.set_flow_run_state(flow_run.id, Running(), force=True)
