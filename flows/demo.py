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

import shutil
import threading
import time
from collections import Counter
from collections.abc import Mapping
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

from flywheel.demo_story import (
    DemoStory,
    RolloutSeen,
    RolloutSkipped,
    TrainingSeen,
    check_story,
    skipped_checks,
)

if TYPE_CHECKING:
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.objects import FlowRun

    from flows.training import TrainingParams
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
) -> DemoStory:
    """Run the three steps, print what happened, and return what each step observed."""
    from flywheel.runtime import start_run_context

    console = console or Console(stderr=True)
    ctx = start_run_context(profile, config_dir)
    from flywheel.stack import use_active_stack

    api = use_active_stack(ctx.settings)  # `flywheel up` running: runs land in its Prefect server and stay
    console.print(f"Prefect API: {api}" if api else "Prefect: no stack running (`flywheel up`); an ephemeral "
                  "server is used, its run pages vanish when the demo ends, and no rollout can run")
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
    for (number, title, sabotage), batch_files in zip(STEPS, batches, strict=True):
        console.rule(f"{number}. {title}")
        _arrive(batch_files, ctx.source)
        since = datetime.now(UTC)
        step, run = _train_step(number, title, base.model_copy(update={"shuffle_labels": sabotage}), registry,
                                ctx.model_name)
        seen.append(step)
        runs.append(run)
        console.print(f"-> {step.state}: {ctx.model_name} v{step.version} is {step.outcome}"
                      + (f" (failed: {', '.join(step.failed_rules)})" if step.failed_rules else ""))
        if number == 2 and step.outcome == "challenger":
            rollout = _follow_rollout(ctx, console, api, registry, step.version, since, rollout_timeout_s)
    story = DemoStory(first=seen[0], second=seen[1], rollout=rollout, sabotaged=seen[2])
    _summary(console, runs, story, ctx)
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
    return failures


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
