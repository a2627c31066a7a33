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
    _summary(console, runs, ctx)
    return runs


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
