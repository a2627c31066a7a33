"""`flywheel demo`: the loop end to end on generated churn data, checked against the story it tells.

1. three weeks of daily batches arrive -> the first model is trained and, passing the absolute gates,
   becomes champion;
2. a fourth week arrives -> a new candidate is re-scored against the champion on the same holdout and
   becomes challenger; with a stack running (`flywheel up`), its registration event starts the canary
   rollout, which the demo feeds with traffic until it ends (`Promoted` expected);
3. a sabotaged candidate (trained on shuffled labels) shows the gates rejecting a bad model: it is
   registered as rejected and no alias moves.

Each step's observations (outcome, the registry's aliases before and after, the rollout run's final
state) go into a `DemoStory`; `flywheel.demo_story.check_story` names every expected outcome that did
not happen, and `flywheel demo` exits 1 with those lines.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

from flywheel.clock import Clock, SimulatedClock, describe_clock, wall_now
from flywheel.demo_story import (
    ClockSeen,
    DecisionSeen,
    DemoStory,
    LifecycleSeen,
    RealizedSeen,
    RetrainSeen,
    RolloutSeen,
    RolloutSkipped,
    Skipped,
    TrainingSeen,
    WebhookSeen,
    WindowSeen,
    check_story,
    cooldown_gap,
    skipped_checks,
)

if TYPE_CHECKING:
    import pandas as pd
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.objects import FlowRun

    from flows.training import TrainingParams
    from flywheel.outcomes import OutcomeIngestReport
    from flywheel.registry import Registry
    from flywheel.runtime import RunContext

ROLLOUT_DEPLOYMENT = "rollout"  # deployments/prefect.yaml: started by flywheel.model.challenger-registered
NO_STACK = ("no stack running (`flywheel up` starts one, `make demo` does): no served rollout deployment "
            "answers the challenger-registered event")
STEPS = (  # number, title, train on shuffled labels
    (1, "three weeks arrive: the first model", False),
    (2, "a new week arrives: candidate vs champion", False),
    (3, "sabotaged candidate (shuffled labels)", True),
)


def run_demo(
    profile: str | None,
    config_dir: Path | None,
    days: int = 28,
    rows_per_day: int = 1000,
    seed: int = 42,
    console: Console | None = None,
    rollout_timeout_s: float = 300.0,
    lifecycle: bool = True,
) -> DemoStory:
    """Run the three steps, then (on a stack) step 4, the lifecycle; print what happened and the timeline,
    and return what each step observed. `lifecycle` False (or FLYWHEEL_DEMO_LIFECYCLE=0): the three steps."""
    from flywheel.runtime import start_run_context

    console = console or Console(stderr=True)
    ctx = start_run_context(profile, config_dir)
    from flywheel.stack import project_clock, use_active_stack

    api = use_active_stack(ctx.settings)  # `flywheel up` running: runs land in its Prefect server and stay
    console.print(f"Prefect API: {api}" if api else "Prefect: no stack running (`flywheel up`); an ephemeral "
                  "server is used, its run pages vanish when the demo ends, and no rollout can run")
    clock = project_clock(ctx.settings)  # the stack's (every process of it tells the same time), else ours
    console.print(f"project clock: {describe_clock(clock)}", soft_wrap=True, highlight=False)
    files = _demo_batches(ctx, days, rows_per_day, seed, console)
    batches = [files[: len(files) - 7], files[len(files) - 7 :], []]

    from flows.training import TrainingParams
    from flywheel.audit import AuditLog
    from flywheel.registry import Registry

    registry = Registry(ctx.tracking_uri, AuditLog(ctx.audit_db_url))
    base = TrainingParams(profile=profile, config_dir=str(config_dir) if config_dir else None)
    runs: list[dict[str, Any]] = []
    seen: list[TrainingSeen] = []
    rollout: RolloutSeen | RolloutSkipped | None = None
    timeline = Timeline(clock)
    for (number, title, sabotage), batch_files in zip(STEPS, batches, strict=True):
        console.rule(f"{number}. {title}")
        _arrive(batch_files, ctx.source)
        since = datetime.now(UTC)
        step, run = _train_step(number, title, base.model_copy(update={"shuffle_labels": sabotage}), registry,
                                ctx.model_name)
        seen.append(step)
        runs.append(run)
        timeline.add(f"{number}. training", f"v{step.version} {step.outcome} (run {step.state})",
                     (f"failed: {', '.join(step.failed_rules[:4])}; " if step.failed_rules else "")
                     + f"aliases {dict(step.aliases_before)} -> {dict(step.aliases_after)}")
        console.print(f"-> {step.state}: {ctx.model_name} v{step.version} is {step.outcome}"
                      + (f" (failed: {', '.join(step.failed_rules)})" if step.failed_rules else ""))
        if number == 2 and step.outcome == "challenger":
            rollout = _follow_rollout(ctx, console, api, registry, step.version, since, rollout_timeout_s)
            timeline.add("2. rollout", f"rollout of v{step.version} ended "
                         f"{getattr(rollout, 'state', None) or '(not run)'}",
                         getattr(rollout, "detail", None) or getattr(rollout, "reason", ""))
    story_lifecycle: LifecycleSeen | Skipped | None = None
    if lifecycle and os.environ.get("FLYWHEEL_DEMO_LIFECYCLE", "1") != "0":
        story_lifecycle = run_lifecycle(ctx, console, api, registry, profile, config_dir, files, seed, timeline,
                                        max(rollout_timeout_s, 600.0))
    story = DemoStory(first=seen[0], second=seen[1], rollout=rollout, sabotaged=seen[2], lifecycle=story_lifecycle,
                      clock=timeline.seen())
    _summary(console, runs, story, ctx)
    timeline.print(console)
    if api:
        console.print(f"Prefect runs (kept on the stack): {api.removesuffix('/api')}/runs", soft_wrap=True)
    return story


def report_story(console: Console, story: DemoStory) -> list[str]:
    """Print the verdict on the story: each skipped check and each failure, naming its step; the failures."""
    failures = check_story(story)
    console.rule("the story")
    for line in skipped_checks(story):
        console.print(f"[yellow]skipped[/] {line}", soft_wrap=True)
    for line in failures:
        console.print("[bold red]FAILED[/] ", end="")
        console.print(line, markup=False, soft_wrap=True, highlight=False)
    if not failures:
        second = (f"challenger v{story.second.version} promoted by the canary rollout"
                  if isinstance(story.rollout, RolloutSeen) else f"challenger v{story.second.version} registered")
        console.print(f"[bold green]story checked[/]: champion v{story.first.version}, {second}, "
                      f"sabotaged v{story.sabotaged.version} rejected with no alias moved", soft_wrap=True)
        if isinstance(story.lifecycle, LifecycleSeen):
            console.print(f"[bold green]lifecycle checked[/]: {_lifecycle_line(story.lifecycle)}", soft_wrap=True)
    return failures


def _lifecycle_line(seen: LifecycleSeen) -> str:
    alarm = next((i + 1 for i, w in enumerate(seen.windows) if w.alarm), None)
    cooled = sum(d.suppressed_by == "cooldown" for d in seen.drift_decisions)
    retrain = seen.retrain
    gated = f"retrain v{retrain.version} {retrain.outcome}" if retrain else "no retrain"
    if retrain is not None and retrain.training_source:
        gated += f" (trained on {retrain.training_rows} rows of {retrain.training_source.replace('_', ' ')})"
    if seen.rollout is not None:
        gated += f", its rollout ended {seen.rollout.state}"
    filled = [r for r in seen.realized if r.realized] if not isinstance(seen.realized, Skipped) else []
    if filled:
        first = filled[0]
        gated += (f"; late labels: realized ROC AUC {first.realized_roc_auc:.3f} beside the estimate "
                  f"{first.estimated_roc_auc:.3f} for window {first.window} ({len(filled)} windows filled in)")
    hook = (f"webhook retrain skipped ({seen.webhook.reason})" if isinstance(seen.webhook, Skipped)
            else f"webhook created {seen.webhook.runs_created} training run")
    gap = cooldown_gap(seen)
    held = (f" ({gap.total_seconds() / 3600:.1f} simulated h after the fire, inside the "
            f"{seen.cooldown.total_seconds() / 3600:g} h cooldown)" if gap is not None and seen.cooldown else "")
    return (f"drift alarm at window {alarm}, one drift trigger fired, {cooled} suppressed by the cooldown{held}, "
            f"{gated}; {hook}")


def _follow_rollout(ctx: RunContext, console: Console, api: str | None, registry: Registry, version: str,
                    since: datetime, timeout_s: float) -> RolloutSeen | RolloutSkipped:
    """On a stack: watch the rollout the challenger's registration started. Without one: say it is skipped."""
    if not api:
        console.print(f"(rollout skipped: {NO_STACK})")
        return RolloutSkipped(NO_STACK)
    console.rule("the challenger-registered event started a rollout: sending traffic")
    return watch_rollout(ctx, console, api, registry, version, since, timeout_s)


def _demo_batches(ctx: RunContext, days: int, rows_per_day: int, seed: int, console: Console) -> list[Path]:
    """The demo's daily batch files, generated once into `<data_dir>/demo_source`."""
    from flywheel.datagen import GeneratorSpec, write_batches

    staging = ctx.settings.resolve(ctx.settings.paths.data_dir) / "demo_source"
    if not any(staging.glob("batch_*")):
        console.rule("generating demo data")
        # recent enough that features are inside the 90-day TTL (online serving, batch scoring), old
        # enough that every 30-day label has arrived by today
        start = date.today() - timedelta(days=days + 32)
        write_batches(GeneratorSpec(seed=seed, days=days, rows_per_day=rows_per_day, start=start), staging)
    return sorted(staging.glob("batch_*"))


def _arrive(batch_files: list[Path], incoming: Path) -> None:
    incoming.mkdir(parents=True, exist_ok=True)
    for f in batch_files:
        if not (incoming / f.name).exists():
            shutil.copy2(f, incoming / f.name)


def _train_step(number: int, title: str, params: TrainingParams, registry: Registry, model: str,
                ) -> tuple[TrainingSeen, dict[str, Any]]:
    """Run the training flow once; what it registered and the aliases around it, and its summary row."""
    from flows.training import training_pipeline
    from flywheel.errors import FlywheelError

    before = registry.aliases(model)
    started = time.perf_counter()
    state = training_pipeline(params, return_state=True)
    try:
        result = state.result(raise_on_failure=True)
    except FlywheelError as exc:
        raise FlywheelError(f"step {number} ({title}): the training run failed: {exc}") from exc
    seen = TrainingSeen(version=result.version, outcome=result.outcome, state=state.name,
                        failed_rules=tuple(result.failed_rules), aliases_before=before,
                        aliases_after=registry.aliases(model))
    run = {"step": f"{number}. {title}", "state": state.name, "seconds": round(time.perf_counter() - started, 1),
           **result.model_dump()}
    return seen, run


def _known_online(url: str, ids: list[Any]) -> list[Any]:
    """The ids the service knows (a 404 names the unknown ones)."""
    import httpx

    unknown: set[Any] = set()
    with httpx.Client(timeout=30) as client:
        for start in range(0, len(ids), 500):
            r = client.post(url, json={"entities": ids[start:start + 500]})
            if r.status_code == 404:
                unknown |= set(r.json().get("unknown_ids") or [])
    return [i for i in ids if i not in unknown] or ids


def watch_rollout(ctx: RunContext, console: Console, api: str, registry: Registry, version: str, since: datetime,
                  timeout_s: float = 300.0) -> RolloutSeen:
    """Send /predict traffic to the stack's service until the rollout run the challenger-registered event
    started for `version` (a run of the `rollout` deployment created after `since`) reaches a final state,
    or `timeout_s` passes; what it ended in, and the aliases after it."""
    from prefect import get_client

    stop, codes, worker = _start_traffic(ctx)
    deadline = time.monotonic() + timeout_s
    run = None
    try:
        with get_client(sync_client=True) as client:
            while time.monotonic() < deadline:
                run = _rollout_run(client, ctx.model_name, version, since) or run
                if run is not None and run.state is not None and run.state.is_final():
                    break
                time.sleep(1)
    finally:
        stop.set()
        worker.join(timeout=10)
    seen = _rollout_seen(run, version, timeout_s, api, registry.aliases(ctx.model_name))
    answers = ", ".join(f"{n} x {code}" for code, n in codes.most_common())
    ended = f"ended {seen.state}" if seen.state else "not seen to end"
    console.print(f"-> rollout {ended}: {seen.detail} ({sum(codes.values())} requests of 50 entities sent: "
                  f"{answers or 'none'})", soft_wrap=True)
    return seen


def _rollout_run(client: SyncPrefectClient, model: str, version: str, since: datetime) -> FlowRun | None:
    """The newest run of the rollout deployment for `model` v`version` created at or after `since`."""
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName
    from prefect.client.schemas.sorting import FlowRunSort

    runs = client.read_flow_runs(
        deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[ROLLOUT_DEPLOYMENT])),
        sort=FlowRunSort.EXPECTED_START_TIME_DESC, limit=20)
    for run in runs:
        params = (run.parameters or {}).get("params") or {}
        if (run.created is None or run.created >= since) and params.get("model_name") == model \
                and str(params.get("challenger_version")) == version:
            return run
    return None


def _rollout_seen(run: FlowRun | None, version: str, timeout_s: float, api: str,
                  aliases: Mapping[str, str]) -> RolloutSeen:
    """What the watch saw: the run's final state name and message, else why no final state was seen."""
    if run is None:
        return RolloutSeen(None, f"no run of the '{ROLLOUT_DEPLOYMENT}' deployment for v{version} appeared within "
                           f"{timeout_s:.0f} s (is the stack's deployments process up? `flywheel status`)", aliases)
    page = f"{api.removesuffix('/api')}/runs/flow-run/{run.id}"
    if run.state is None or not run.state.is_final():
        name = run.state.name if run.state else "without a state"
        return RolloutSeen(None, f"rollout run {run.name} still {name} after {timeout_s:.0f} s ({page})", aliases)
    return RolloutSeen(run.state.name, f"{run.state.message or 'no message'} ({page})", aliases)


def _start_traffic(ctx: RunContext) -> tuple[threading.Event, Counter[str], threading.Thread]:
    """A daemon thread posting 50 known entities to the service's /predict every 50 ms until the returned
    event is set; answers counted by status code (or exception name)."""
    import random

    import httpx
    import pandas as pd

    from flywheel.featurestore import LABELS_FILE, dataset_dir

    ids = pd.read_parquet(dataset_dir(ctx.offline_dir, ctx.dataset) / LABELS_FILE, columns=[ctx.dataset.entity])
    ids = sorted(ids[ctx.dataset.entity].unique().tolist())[:5000]
    url = f"http://{ctx.settings.serve.host}:{ctx.settings.serve.port}/predict"
    ids = _known_online(url, ids)  # entities whose features all fell out of the TTL are unknown (404)
    stop = threading.Event()
    codes: Counter[str] = Counter()

    def traffic() -> None:
        rng = random.Random(0)
        with httpx.Client(timeout=5) as client:
            while not stop.is_set():
                try:
                    codes[str(client.post(url, json={"entities": rng.sample(ids, min(50, len(ids)))}).status_code)] += 1
                except httpx.HTTPError as exc:
                    codes[type(exc).__name__] += 1
                stop.wait(0.05)

    worker = threading.Thread(target=traffic, daemon=True)
    worker.start()
    return stop, codes, worker


def _summary(console: Console, runs: list[dict[str, Any]], story: DemoStory, ctx: RunContext) -> None:
    from flywheel.audit import AuditLog

    table = Table(title="Training runs")
    for col in ("step", "state", "version", "outcome", "failed rules", "seconds"):
        table.add_column(col)
    for r in runs:
        failed = r["failed_rules"]
        shown = ", ".join(failed[:3]) + (f" (+{len(failed) - 3} more)" if len(failed) > 3 else "")
        table.add_row(r["step"], r["state"], r["version"], r["outcome"], shown or "-", str(r["seconds"]))
    console.print(table)
    if isinstance(story.rollout, RolloutSeen):
        console.print(f"rollout of v{story.second.version}: {story.rollout.state or 'not seen to end'}: "
                      f"{story.rollout.detail}", soft_wrap=True)
    audit = Table(title="Alias audit log (append-only)")
    for col in ("at", "alias", "from", "to", "reason", "actor"):
        audit.add_column(col)
    for e in AuditLog(ctx.audit_db_url).entries(ctx.model_name):
        audit.add_row(e.at.isoformat(timespec="seconds"), e.alias, e.from_version or "-", e.to_version or "-",
                      e.reason, e.actor)
    console.print(audit)
    console.print(
        f"MLflow UI: uv run mlflow ui --backend-store-uri {ctx.tracking_uri} "
        "then open http://127.0.0.1:5000/#/models and the 'flywheel' experiment's runs"
    )


# ------------------------------------------------------------------------------------------ step 4: the lifecycle

TRAINING_DEPLOYMENT = "training"  # deployments/prefect.yaml: started by flywheel.retrain.requested
LIFECYCLE_TITLE = "drift -> monitoring -> trigger -> retrain -> rollout, then a signed webhook retrain"
DRIFT = 0.6  # covariate drift strength of the days that arrive in step 4
DRIFT_DAYS = 2  # after the demo's days: their 30-day labels have arrived by today too
WINDOWS = 3  # 1: drifted, no alarm (persistence 2); 2: alarm, the trigger fires; 3: alarm, cooldown
WINDOW_ROWS = 600  # configs/monitoring.yaml alarm.min_rows is 500: a smaller window is never judged
PREDICT_BATCH = 100
WEBHOOK_REASON = "demo step 4: a signed webhook asks for a retrain"


class Timeline:
    """What happened, when, and the evidence: the table the demo ends with. Times are the project clock's
    (simulated under `make demo`), each row beside the wall seconds since the demo began."""

    def __init__(self, clock: Clock, wall: Callable[[], datetime] = wall_now) -> None:
        self.clock, self._wall = clock, wall
        self.began = wall()
        self.rows: list[tuple[datetime, float, str, str, str]] = []  # (project time, wall s, step, what, evidence)
        self.samples: list[tuple[datetime, datetime]] = []  # (project, wall) read as each row was added

    def now(self) -> datetime:
        return self.clock.now()

    def add(self, step: str, what: str, evidence: str = "", at: datetime | None = None) -> None:
        """A row at project time `at` (default: now); `at` given, the wall column says when it was reported."""
        wall, now = self._wall(), self.clock.now()
        self.samples.append((now, wall))
        self.rows.append((at or now, (wall - self.began).total_seconds(), step, what, evidence))

    def seen(self) -> ClockSeen:
        clock = self.clock
        return ClockSeen(simulated=isinstance(clock, SimulatedClock),
                         speed=clock.speed if isinstance(clock, SimulatedClock) else 1.0, samples=tuple(self.samples))

    def print(self, console: Console) -> None:
        simulated = isinstance(self.clock, SimulatedClock)
        table = Table(title="Timeline" + (f" (simulated time, {self.clock.speed:g}x wall time)"
                                          if isinstance(self.clock, SimulatedClock) else ""), show_lines=True)
        for col in ("simulated time (UTC)" if simulated else "time (UTC)", "wall s", "step", "what happened",
                    "evidence"):
            table.add_column(col, overflow="fold")
        for at, wall, step, what, evidence in sorted(self.rows, key=lambda row: row[0]):  # stable: ties keep order
            table.add_row(at.strftime("%m-%d %H:%M:%S" if simulated else "%H:%M:%S"), f"{wall:.0f}", step, what,
                          evidence or "-")
        console.print(table)


def run_lifecycle(ctx: RunContext, console: Console, api: str | None, registry: Registry, profile: str | None,
                  config_dir: Path | None, demo_files: list[Path], seed: int, timeline: Timeline,
                  timeout_s: float = 600.0) -> LifecycleSeen | Skipped:
    """Step 4 on the stack: drifted days arrive and are served, monitored window by window until the drift
    trigger fires (once) and is then held by the cooldown. After window 1, the outcomes of every snapshot
    served so far land (step 2's traffic and window 1's drifted rows): the retrain the trigger starts trains
    on those served features joined with their outcomes (configs/triggers.yaml: drift_detected.training_source)
    and is followed to its gates (and a challenger to its rollout's decision); then the labels of windows 2-3
    land and fill in the realized metric; then a signed webhook asks for one more retrain."""
    if not api:
        timeline.add("4", "skipped", NO_STACK)
        return Skipped(NO_STACK)
    champion = registry.aliases(ctx.model_name).get("champion")
    if not champion:
        timeline.add("4", "skipped", "no champion to monitor")
        return Skipped("no champion to monitor (steps 1-2 registered none)")
    started_wall = datetime.now(UTC)  # Prefect's runs are created on wall time
    started = timeline.now()  # the decisions are taken on the project's
    rows, labels = _drifted_days(ctx, demo_files, seed, console, timeline)

    def after_window(n: int) -> None:  # window 1's labels land a window late, before the drift trigger fires
        if n == 1:
            _served_outcomes(ctx, console, labels.iloc[:WINDOW_ROWS], timeline)

    windows = _monitored_traffic(ctx, console, profile, config_dir, rows, timeline, after_window)
    decisions = _drift_decisions(ctx, started)
    for d in decisions:
        by = f" by {d.suppressed_by}" if d.suppressed_by else ""
        timeline.add("4. trigger", f"drift decision: {d.outcome}{by}", f"{d.reason} (decision {d.id[:8]})", at=d.at)
    fired = next((d for d in decisions if d.outcome == "fire"), None)
    retrain = rollout = None
    if fired is not None:
        retrain = _follow_retrain(ctx, console, api, registry, fired, timeline, timeout_s)
        if retrain.outcome == "challenger" and retrain.version:
            console.rule(f"the retrained challenger v{retrain.version} is rolled out: sending traffic")
            rollout = watch_rollout(ctx, console, api, registry, retrain.version, started_wall, timeout_s)
            timeline.add("4. rollout", f"rollout of v{retrain.version} ended {rollout.state or '(not seen to end)'}",
                         rollout.detail)
    else:
        console.print("-> no drift decision fired: no retrain to follow")
    realized = _late_outcomes(ctx, console, profile, config_dir, labels.iloc[WINDOW_ROWS:], windows, timeline)
    webhook = _webhook_retrain(ctx, console, timeline)
    return LifecycleSeen(windows=tuple(windows), drift_decisions=tuple(decisions), retrain=retrain, rollout=rollout,
                         webhook=webhook, realized=realized, cooldown=_cooldown(ctx))


def _cooldown(ctx: RunContext) -> timedelta:
    from flywheel.trigger_policy import load_policy

    return load_policy(ctx.settings.resolve(ctx.settings.triggers.policy_file)).discipline.cooldown


def _drifted_days(ctx: RunContext, demo_files: list[Path], seed: int, console: Console,
                  timeline: Timeline) -> tuple[list[dict[str, Any]], pd.DataFrame]:
    """DRIFT_DAYS days after the demo's, with covariate drift (same seed, same customers), arrived in the
    incoming folder (the retrain trains on them); their feature rows as /predict sends them, shuffled, each
    naming its snapshot (the dataset's timestamp, so its outcome can join it later), and those rows'
    labels (entity, snapshot, label, context columns), in the served order, which land late in the lifecycle."""
    import json

    import pandas as pd

    from flywheel.datagen import DriftSpec, GeneratorSpec, generate

    console.rule(f"4. {LIFECYCLE_TITLE}")
    start = date.fromisoformat(demo_files[0].stem.removeprefix("batch_"))
    days = len(demo_files)
    staging = ctx.settings.resolve(ctx.settings.paths.data_dir) / "demo_drift"
    if not any(staging.glob("batch_*")):
        rows_per_day = len(pd.read_parquet(demo_files[0], columns=[ctx.dataset.entity]))
        spec = GeneratorSpec(seed=seed, days=days + DRIFT_DAYS, rows_per_day=rows_per_day, start=start,
                             drift=DriftSpec(covariate=DRIFT), drift_from_day=days)
        staging.mkdir(parents=True, exist_ok=True)
        for day, df in generate(spec)[days:]:
            df.to_parquet(staging / f"batch_{day.isoformat()}.parquet", index=False)
    files = sorted(staging.glob("batch_*"))
    _arrive(files, ctx.source)
    frame = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)
    ds = ctx.dataset
    frame = frame.sample(frac=1.0, random_state=seed).head(WINDOWS * WINDOW_ROWS)
    served = frame[[ds.entity, ds.timestamp, *(f.name for f in ds.features)]]
    names = ", ".join(f.stem.removeprefix("batch_") for f in files)
    console.print(f"-> {len(files)} drifted days arrived ({names}, covariate drift {DRIFT}) in {ctx.source}")
    timeline.add("4. drift", f"{len(files)} drifted days arrived", f"{names}; DriftSpec(covariate={DRIFT})")
    # NaN -> null, numpy -> JSON, the snapshot time -> ISO 8601 in UTC
    rows = json.loads(served.to_json(orient="records", date_format="iso", date_unit="us"))
    context = [c for c in ds.context_columns if c in frame.columns]  # the fairness gate's attribute rides along
    return rows, frame[[ds.entity, ds.timestamp, ds.label, *context]].reset_index(drop=True)


def _monitored_traffic(ctx: RunContext, console: Console, profile: str | None, config_dir: Path | None,
                       rows: list[dict[str, Any]], timeline: Timeline,
                       after_window: Callable[[int], None] | None = None) -> list[WindowSeen]:
    """Each window: its rows sent as raw-row /predict requests, the prediction log flushed, then the
    monitoring flow on exactly the time since the previous window, as the hourly deployment would; then
    `after_window(n)` (1-based)."""
    import httpx

    from flows.monitoring import MonitoringParams, monitoring
    from flywheel.stack import admin_token_env
    from tasks.rollout import ServiceClient

    os.environ.update(admin_token_env(ctx.settings))  # the stack's token (the rollout's, for flush-log)
    base = f"http://{ctx.settings.serve.host}:{ctx.settings.serve.port}"
    service = ServiceClient(base, ctx.settings.serve.admin_token_env)
    seen: list[WindowSeen] = []
    previous = timeline.now()  # windows on the project's time: the service stamps its log on the same clock
    try:
        service.flush_log(30)  # whatever was queued before belongs to earlier windows
        with httpx.Client(timeout=30) as http:
            for n in range(WINDOWS):
                chunk = rows[n * WINDOW_ROWS:(n + 1) * WINDOW_ROWS]
                codes: Counter[int] = Counter()
                for i in range(0, len(chunk), PREDICT_BATCH):
                    codes[http.post(f"{base}/predict", json={"rows": chunk[i:i + PREDICT_BATCH]}).status_code] += 1
                flushed = service.flush_log(30)
                end = timeline.now()
                result = monitoring(MonitoringParams(
                    profile=profile, config_dir=str(config_dir) if config_dir else None, report=False,
                    window_hours=max((end - previous).total_seconds(), 1.0) / 3600, end=end))
                previous = end
                window = WindowSeen(rows=result.rows, status=result.status, alarm=result.alarm,
                                    decisions=tuple(result.decisions), key=result.window, end=end,
                                    estimated_roc_auc=result.estimated_roc_auc)
                seen.append(window)
                answers = ", ".join(f"{k} x {v}" for k, v in sorted(codes.items()))
                drifted = ", ".join(result.drifted_features[:4]) or "none"
                console.print(f"-> window {n + 1}: {len(chunk)} drifted rows sent ({answers}; log flushed: "
                              f"{flushed.get('written', '?')} written); monitoring of v{result.version}: "
                              f"{result.rows} rows, {result.status}, alarm {result.alarm}; drifted: {drifted}; "
                              f"decisions: {'; '.join(result.decisions) or 'none'}", soft_wrap=True)
                timeline.add(f"4. window {n + 1}",
                             f"{len(chunk)} drifted rows served; monitoring: {result.status}"
                             + (", ALARM" if result.alarm else ", no alarm"),
                             f"v{result.version}, {result.rows} rows judged; drifted: {drifted}", at=end)
                if after_window is not None:
                    after_window(n + 1)
    finally:
        service.close()
    return seen


def _land_labels(ctx: RunContext, labels: pd.DataFrame, arrived: datetime, name: str
                 ) -> tuple[OutcomeIngestReport, Path]:
    """A labels batch (entity, snapshot, label, context) arriving at `arrived`, written to the dataset's outcome
    folder and stored through the outcome ingest (validated; a bad batch is quarantined: FlywheelError)."""
    import pandas as pd

    from flywheel.outcomes import ingest_outcome_file

    ds, settings = ctx.dataset, ctx.settings
    assert ds.outcomes is not None and ds.label_timestamp is not None
    folder = settings.resolve(ds.outcomes.source or Path(settings.paths.incoming_dir) / f"{ds.name}_labels")
    folder.mkdir(parents=True, exist_ok=True)
    batch = folder / f"labels_{arrived:%Y-%m-%dT%H%M%S}_{name}.parquet"
    labels.assign(**{ds.label_timestamp: pd.Timestamp(arrived)}).to_parquet(batch, index=False)
    # stamped on the project clock: the volume trigger counts by it
    report = ingest_outcome_file(batch, ds, ctx.audit_db_url, settings.resolve(settings.paths.quarantine_dir), arrived)
    return report, batch


def _served_outcomes(ctx: RunContext, console: Console, drifted: pd.DataFrame, timeline: Timeline) -> int:
    """The outcomes of every feature snapshot the service has served so far land now, after the predictions
    (step 2's rollout traffic and the `drifted` rows of window 1): the prediction log names each snapshot, its
    label comes from the offline store's labels (or the drifted days'). The drift retrain trains on these
    served features joined with their outcomes. Returns the rows stored (0, said on the timeline, when none)."""
    import pandas as pd

    from flywheel.errors import FlywheelError
    from flywheel.featurestore import LABELS_FILE, dataset_dir
    from flywheel.outcomes import read_served

    ds, settings = ctx.dataset, ctx.settings
    console.rule("outcomes of what the service served so far land: the drift retrain will train on them")
    if ds.outcomes is None or ds.label_timestamp is None:
        timeline.add("4. served outcomes", "skipped", "the dataset collects no outcomes")
        return 0
    arrived = timeline.now()
    served = read_served(settings.store_url(settings.serve.prediction_log_url), ctx.model_name, arrived)

    def keyed(frame: pd.DataFrame) -> pd.DataFrame:  # one (entity, snapshot) key type on both sides
        ids = frame[ds.entity].astype("int64" if ds.entity_type == "int" else str)
        times = pd.to_datetime(frame[ds.timestamp], utc=True).astype("datetime64[us, UTC]")
        return frame.assign(**{ds.entity: ids, ds.timestamp: times})

    snapshots = keyed(pd.DataFrame({ds.entity: served["entity"], ds.timestamp: served["feature_time"]}))
    snapshots = snapshots.drop_duplicates()
    known = pd.read_parquet(dataset_dir(ctx.offline_dir, ds) / LABELS_FILE)
    columns = [c for c in drifted.columns if c in known.columns]
    known = keyed(pd.concat([known[columns], drifted[columns]], ignore_index=True))
    known = known.drop_duplicates([ds.entity, ds.timestamp], keep="last")
    labels = snapshots.merge(known, on=[ds.entity, ds.timestamp], how="inner")
    try:
        report, batch = _land_labels(ctx, labels, arrived, "served")
    except FlywheelError as exc:
        timeline.add("4. served outcomes", "the labels batch was refused by the outcome ingest", str(exc)[:300])
        console.print(f"-> the served snapshots' labels were refused: {exc}", soft_wrap=True)
        return 0
    console.print(f"-> outcomes of {report.rows} served snapshots landed ({len(snapshots)} snapshots served so far; "
                  f"{batch.name})", soft_wrap=True)
    timeline.add("4. served outcomes", f"outcomes of {report.rows} served snapshots landed (step 2's traffic, "
                 "window 1's drifted rows)", f"{batch.name}; arrived {arrived:%m-%d %H:%M:%S}, after the "
                 "predictions; the drift retrain trains on them", at=arrived)
    return report.rows


def _late_outcomes(ctx: RunContext, console: Console, profile: str | None, config_dir: Path | None,
                   labels: pd.DataFrame, windows: list[WindowSeen], timeline: Timeline
                   ) -> tuple[RealizedSeen, ...] | Skipped:
    """The labels of the drifted rows of windows 2-3 land (a batch through the outcome ingest, arriving now:
    after every prediction they judge; window 1's landed a window late, before the drift retrain), then the
    monitoring flow runs on the time since the last window and fills in the drifted windows' realized
    performance beside their estimates."""
    from flows.monitoring import MonitoringParams, monitoring
    from flywheel.errors import FlywheelError
    from flywheel.monitoring.realized import PerformanceHistory
    from flywheel.stack import admin_token_env
    from tasks.rollout import ServiceClient

    ds, settings = ctx.dataset, ctx.settings
    console.rule("the drifted rows' labels land late: realized performance beside the estimate")
    if ds.outcomes is None or ds.label_timestamp is None or not windows or windows[-1].end is None:
        reason = "the dataset collects no outcomes" if ds.outcomes is None else "no monitored window to fill in"
        timeline.add("4. outcomes", "skipped", reason)
        return Skipped(reason)
    arrived = timeline.now()  # the labels arrive now on the project's clock: after every prediction they judge
    try:
        report, batch = _land_labels(ctx, labels, arrived, "demo")
    except FlywheelError as exc:
        timeline.add("4. outcomes", "the labels batch was refused by the outcome ingest", str(exc)[:300])
        return Skipped(f"the labels batch was refused by the outcome ingest: {exc}")
    console.print(f"-> {report.rows} labels of the drifted rows served in windows 2-{WINDOWS} landed ({batch.name}, "
                  f"batch {report.batch_id[:12]})", soft_wrap=True)
    timeline.add("4. outcomes", f"labels of {report.rows} drifted rows (windows 2-{WINDOWS}) landed late "
                 "(outcome ingest)", f"{batch.name}; arrived {arrived:%m-%d %H:%M:%S}, after every prediction "
                 "they judge")
    os.environ.update(admin_token_env(settings))
    service = ServiceClient(f"http://{settings.serve.host}:{settings.serve.port}", settings.serve.admin_token_env)
    try:
        service.flush_log(30)  # the rollout's traffic since the last window
    finally:
        service.close()
    end = timeline.now()
    result = monitoring(MonitoringParams(
        profile=profile, config_dir=str(config_dir) if config_dir else None, report=False,
        window_hours=max((end - windows[-1].end).total_seconds(), 1.0) / 3600, end=end))
    history = PerformanceHistory(ctx.audit_db_url)
    try:
        latest = history.latest(ctx.model_name)
    finally:
        history.close()
    seen = []
    for n, w in enumerate(windows, start=1):
        rec = latest.get(w.key)
        if rec is None:
            continue
        seen.append(RealizedSeen(window=n, scored_rows=rec.scored_rows, labelled_rows=rec.labelled_rows,
                                 min_labelled_rows=rec.min_labelled_rows, realized_roc_auc=rec.realized_roc_auc,
                                 estimated_roc_auc=rec.estimated_roc_auc, roc_auc_error=rec.roc_auc_error))
        at_serving = f"{w.estimated_roc_auc:.3f}" if w.estimated_roc_auc is not None else "-"
        console.print(f"-> window {n}: {rec.summary()} (estimated {at_serving} when it was served)", soft_wrap=True)
        timeline.add(f"4. realized {n}", f"window {n}: {rec.summary()}",
                     f"estimate when served {at_serving} on {w.rows} rows; filled in by the monitoring run of "
                     f"v{result.version} at {end:%m-%d %H:%M:%S}", at=end)
    if not seen:
        console.print(f"-> the monitoring run filled in no drifted window ({'; '.join(result.realized) or 'none'})",
                      soft_wrap=True)
    return tuple(seen)


def _drift_decisions(ctx: RunContext, since: datetime) -> list[DecisionSeen]:
    """The drift decisions recorded since `since`, oldest first (flywheel_trigger_decisions)."""
    from flywheel.trigger_decisions import TriggerDecisions

    store = TriggerDecisions(ctx.audit_db_url)
    try:
        found = [d for d in store.decisions(ctx.model_name, limit=50)
                 if d.kind == "drift_detected" and d.at >= since - timedelta(seconds=5)]
    finally:
        store.dispose()
    return [DecisionSeen(id=d.id, outcome=d.outcome, suppressed_by=d.suppressed_by, reason=d.reason,
                         flow_run_id=d.flow_run_id, at=d.at) for d in reversed(found)]


def _follow_retrain(ctx: RunContext, console: Console, api: str, registry: Registry, fired: DecisionSeen,
                    timeline: Timeline, timeout_s: float) -> RetrainSeen:
    """The training run the fired decision's event started on the stack, waited for until it ends; the
    candidate it registered and the gates' outcome."""
    from prefect import get_client

    from tasks.triggers import link_started_run

    console.rule("the drift trigger fired: the training deployment retrains on the stack")
    before = registry.aliases(ctx.model_name)
    run_id = fired.flow_run_id or link_started_run(fired.id, ctx.audit_db_url, wait_s=90)
    if run_id is None:
        timeline.add("4. retrain", "no training run found for the fired decision", f"decision {fired.id}")
        return RetrainSeen(None, None, None, None, f"no run of the '{TRAINING_DEPLOYMENT}' deployment named "
                           f"decision {fired.id} within 90 s (is the stack's deployments process up?)")
    page = f"{api.removesuffix('/api')}/runs/flow-run/{run_id}"
    deadline = time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(run_id)
        timeline.add("4. retrain", f"training run {run.name} started by the drift trigger",
                     f"parameters {(run.parameters or {}).get('params')}; {page}")
        while not (run.state and run.state.is_final()) and time.monotonic() < deadline:
            time.sleep(2)
            run = client.read_flow_run(run_id)
    state = run.state.name if run.state and run.state.is_final() else None
    message = (run.state.message or "") if run.state else ""
    if state is None:
        seen = RetrainSeen(run_id, None, None, None, f"run {run.name} still "
                           f"{run.state.name if run.state else 'without a state'} after {timeout_s:.0f} s ({page})")
    else:
        seen = _retrain_outcome(run_id, state, message, before, registry.aliases(ctx.model_name), page)
        seen = replace(seen, **_trained_on(registry, ctx.model_name, seen.version))
    trained = (f"; trained on {seen.training_rows} rows from {seen.training_source}" if seen.training_source
               else "")
    console.print(f"-> training run {run.name} ended {state or 'not seen to end'}: "
                  f"v{seen.version or '?'} {seen.outcome or 'unknown'}{trained} {message}", soft_wrap=True)
    timeline.add("4. gates", f"training run {run.name} ended {state or '(not seen to end)'}: "
                 f"v{seen.version or '?'} {seen.outcome or 'unknown'}{trained}", message or page)
    return seen


def _trained_on(registry: Registry, model: str, version: str | None) -> dict[str, Any]:
    """What the version's training run trained on, from its MLflow run's tags (empty when unknown)."""
    from flows.training import TAG_TRAINING_SOURCE

    if not version:
        return {}
    try:
        tags = registry.client.get_run(registry.model_version(model, version).run_id).data.tags
    except Exception:  # the story check names the unknown source
        return {}
    rows = tags.get("flywheel.training_rows")
    return {"training_source": tags.get(TAG_TRAINING_SOURCE),
            "training_rows": int(rows) if rows and rows.isdigit() else None}


def _retrain_outcome(run_id: str, state: str, message: str, before: Mapping[str, str], after: Mapping[str, str],
                     page: str) -> RetrainSeen:
    """What the retrain's candidate became: a named state (Rejected, Queued, Stale) carries its version in
    its message; a Completed run's challenger shows as the challenger alias (or as champion when a fast
    rollout already promoted it)."""
    import re

    named = re.search(r" v(\d+) ", message)
    if state != "Completed":
        return RetrainSeen(run_id, state, named.group(1) if named else None, state.lower(), f"{message} ({page})")
    for alias in ("challenger", "champion"):
        if after.get(alias) and after.get(alias) != before.get(alias):
            return RetrainSeen(run_id, state, after[alias], "challenger", page)
    return RetrainSeen(run_id, state, None, None, f"no alias moved to a new version ({page})")


def _webhook_retrain(ctx: RunContext, console: Console, timeline: Timeline) -> WebhookSeen | Skipped:
    """A signed POST /hooks/retrain to the stack's receiver; the training runs it created (not waited for)."""
    import json
    import uuid

    import httpx
    from prefect import get_client

    from flywheel.hmacsig import signature_header
    from flywheel.stack import is_running, pid_dir, read_record

    console.rule("a signed webhook requests a retrain")
    name = ctx.settings.webhook.secret_env
    record = read_record(pid_dir(ctx.settings), "webhook")
    secret = os.environ.get(name)
    reason = None
    if record is None or not is_running(record) or not record.url:
        reason = (f"the webhook receiver is not running: `flywheel up` starts it when {name} is set "
                  "(`make demo` sets a throwaway one)")
    elif not secret:
        reason = f"{name} is not set in this shell: the demo cannot sign for the running receiver"
    if reason:
        console.print(f"(webhook skipped: {reason})")
        timeline.add("4. webhook", "skipped", reason)
        return Skipped(reason)
    raw = json.dumps({"reason": WEBHOOK_REASON}).encode()
    delivery = f"demo-{uuid.uuid4().hex[:12]}"
    sent = datetime.now(UTC)
    try:
        r = httpx.post(f"{record.url}/hooks/retrain", content=raw, timeout=30, headers={
            "Content-Type": "application/json", "X-Flywheel-Delivery": delivery,
            "X-Flywheel-Signature": signature_header([secret], int(time.time()), delivery, raw)})
    except httpx.HTTPError as exc:
        timeline.add("4. webhook", "POST /hooks/retrain failed", str(exc))
        return WebhookSeen(None, 0, f"{record.url}: {exc}")
    runs: list[FlowRun] = []
    if r.status_code == 202:
        with get_client(sync_client=True) as client:
            deadline = time.monotonic() + 60
            while not runs and time.monotonic() < deadline:
                time.sleep(1)
                runs = _webhook_runs(client, sent)
            time.sleep(3)  # a second run, had one delivery started two, would exist by now
            runs = _webhook_runs(client, sent)
    states = ", ".join(f"{run.name} {run.state.name if run.state else '?'}" for run in runs)
    console.print(f"-> webhook answered {r.status_code}; training runs created: {len(runs)} ({states or 'none'}); "
                  "the demo does not wait for them to finish (the stack keeps them)", soft_wrap=True)
    timeline.add("4. webhook", f"signed POST /hooks/retrain: HTTP {r.status_code}, {len(runs)} training run(s) "
                 "created (not waited for)", f"delivery {delivery}; {states or r.text[:200]}")
    return WebhookSeen(r.status_code, len(runs), r.text[:200] if r.status_code != 202 else "")


def _webhook_runs(client: SyncPrefectClient, since: datetime) -> list[FlowRun]:
    """Runs of the training deployment created at or after `since` for the demo's webhook reason."""
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    runs = client.read_flow_runs(
        deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[TRAINING_DEPLOYMENT])), limit=50)
    return [run for run in runs if (run.created is None or run.created >= since - timedelta(seconds=5))
            and ((run.parameters or {}).get("params") or {}).get("reason") == WEBHOOK_REASON]
