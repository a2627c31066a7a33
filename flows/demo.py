"""`flywheel demo`: the training half of the loop, end to end, on generated churn data.

1. three weeks of daily batches arrive -> the first model is trained and, if it passes the absolute
   gates, becomes champion;
2. a fourth week arrives -> a new candidate is re-scored against the champion on the same holdout and
   becomes challenger or is rejected;
3. a sabotaged candidate (trained on shuffled labels) shows the gates rejecting a bad model: it is
   registered as rejected and the champion alias does not move.
"""

from __future__ import annotations

import shutil
import time
from collections import Counter
from datetime import date, timedelta
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table


def run_demo(
    profile: str | None,
    config_dir: Path | None,
    days: int = 28,
    rows_per_day: int = 1000,
    seed: int = 42,
    console: Console | None = None,
) -> list[dict[str, Any]]:
    from flywheel.datagen import GeneratorSpec, write_batches
    from flywheel.runtime import start_run_context

    console = console or Console(stderr=True)
    ctx = start_run_context(profile, config_dir)
    from flywheel.stack import use_active_stack

    api = use_active_stack(ctx.settings)  # `flywheel up` running: runs land in its Prefect server and stay
    console.print(f"Prefect API: {api}" if api else "Prefect: no stack running (`flywheel up`); an ephemeral "
                  "server is used and its run pages vanish when the demo ends")
    staging = ctx.settings.resolve(ctx.settings.paths.data_dir) / "demo_source"
    incoming = ctx.source
    incoming.mkdir(parents=True, exist_ok=True)
    if not any(staging.glob("batch_*")):
        console.rule("generating demo data")
        # recent enough that features are inside the 90-day TTL (online serving, batch scoring), old
        # enough that every 30-day label has arrived by today
        start = date.today() - timedelta(days=days + 32)
        write_batches(GeneratorSpec(seed=seed, days=days, rows_per_day=rows_per_day, start=start), staging)
    files = sorted(staging.glob("batch_*"))
    first, second = files[: len(files) - 7], files[len(files) - 7 :]

    def arrive(batch_files: list[Path]) -> None:
        for f in batch_files:
            if not (incoming / f.name).exists():
                shutil.copy2(f, incoming / f.name)

    from flows.training import TrainingParams, training_pipeline

    runs: list[dict[str, Any]] = []
    steps = [
        ("1. three weeks arrive: the first model", first, False),
        ("2. a new week arrives: candidate vs champion", second, False),
        ("3. sabotaged candidate (shuffled labels)", [], True),
    ]
    base = TrainingParams(profile=profile, config_dir=str(config_dir) if config_dir else None)
    for title, batch_files, sabotage in steps:
        console.rule(title)
        arrive(batch_files)
        started = time.perf_counter()
        state = training_pipeline(base.model_copy(update={"shuffle_labels": sabotage}), return_state=True)
        result = state.result(raise_on_failure=True)
        runs.append({"step": title, "state": state.name, "seconds": round(time.perf_counter() - started, 1),
                     **result.model_dump()})
        console.print(f"-> {state.name}: {result.model_name} v{result.version} is {result.outcome}"
                      + (f" (failed: {', '.join(result.failed_rules)})" if result.failed_rules else ""))
        if result.outcome == "challenger":
            if api:
                console.rule("the challenger-registered event started a rollout: sending traffic")
                runs[-1]["rollout"] = watch_rollout(ctx, console, result.version)
            else:
                console.print("(no stack running: `flywheel up` would now roll the challenger out as a canary)")
    _summary(console, runs, ctx)
    return runs


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


def watch_rollout(ctx: Any, console: Console, version: str, timeout_s: float = 180.0) -> str:
    """Send /predict traffic to the stack's service until the triggered rollout promotes or rolls back
    the challenger (read from the audit log), or the timeout passes."""
    import random
    import threading

    import httpx
    import pandas as pd

    from flywheel.audit import AuditLog
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

    audit = AuditLog(ctx.audit_db_url)
    seen = len(audit.entries(ctx.model_name))
    worker = threading.Thread(target=traffic, daemon=True)
    worker.start()
    deadline = time.monotonic() + timeout_s
    outcome = "still running (see the rollout run in the Prefect UI)"
    try:
        while time.monotonic() < deadline:
            for e in audit.entries(ctx.model_name)[seen:]:
                if e.alias == "champion" and e.to_version == version:
                    outcome = f"promoted v{version} to champion: {e.reason}"
                elif e.alias == "challenger" and e.from_version == version and e.to_version is None:
                    outcome = f"rolled back v{version}: {e.reason}"
            if not outcome.startswith("still"):
                break
            time.sleep(1)
    finally:
        stop.set()
        worker.join(timeout=10)
    answers = ", ".join(f"{n} x {code}" for code, n in codes.most_common())
    console.print(f"-> rollout: {outcome} ({sum(codes.values())} requests of 50 entities sent: {answers})")
    return outcome


def _summary(console: Console, runs: list[dict[str, Any]], ctx: Any) -> None:
    from flywheel.audit import AuditLog

    table = Table(title="Training runs")
    for col in ("step", "state", "version", "outcome", "failed rules", "seconds"):
        table.add_column(col)
    for r in runs:
        failed = r["failed_rules"]
        shown = ", ".join(failed[:3]) + (f" (+{len(failed) - 3} more)" if len(failed) > 3 else "")
        table.add_row(r["step"], r["state"], r["version"], r["outcome"], shown or "-", str(r["seconds"]))
    console.print(table)
    for r in runs:
        if r.get("rollout"):
            console.print(f"rollout after step {r['step'][:2]} {r['rollout']}")
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
