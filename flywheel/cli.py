"""The `flywheel` command line. Heavy libraries are imported inside each command, never at start."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from flywheel.errors import FlywheelError

app = typer.Typer(help="Flywheel: a continuous-training loop on Prefect, MLflow, Feast and Great Expectations.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
data_app = typer.Typer(help="Demo data.", no_args_is_help=True)
feature_app = typer.Typer(help="The Feast feature repository.", no_args_is_help=True)
config_app = typer.Typer(help="Settings.", no_args_is_help=True)
outcomes_app = typer.Typer(help="Outcomes (delayed labels): validate and store label batches.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(outcomes_app, name="outcomes")
app.add_typer(feature_app, name="feature")
app.add_typer(config_app, name="config")
console = Console(stderr=True)

ProfileOpt = Annotated[str | None, typer.Option("--profile", "-p", help="local | ci | production")]
ConfigDirOpt = Annotated[Path | None, typer.Option("--config-dir", help="folder holding base.yaml")]
DatasetOpt = Annotated[Path | None, typer.Option("--dataset", "-d", help="dataset definition YAML")]


def _settings(profile: str | None, config_dir: Path | None):
    from flywheel.settings import apply_runtime_environment, load_settings

    settings = load_settings(profile=profile, config_dir=config_dir)
    apply_runtime_environment(settings)
    return settings


def _fail(exc: Exception) -> None:
    console.print("[bold red]error:[/]", end=" ")
    console.print(str(exc), markup=False, soft_wrap=True, highlight=False)
    raise typer.Exit(code=2)


@config_app.command("show")
def config_show(profile: ProfileOpt = None, config_dir: ConfigDirOpt = None,
                schema: Annotated[bool, typer.Option(help="print the JSON schema instead")] = False) -> None:
    """Print the merged settings (or their JSON schema)."""
    from flywheel.settings import Settings

    if schema:
        print(json.dumps(Settings.model_json_schema(by_alias=True), indent=2))
        return
    try:
        settings = _settings(profile, config_dir)
    except FlywheelError as exc:
        _fail(exc)
    print(settings.model_dump_json(indent=2, by_alias=True))


@data_app.command("generate")
def data_generate(
    out: Annotated[Path | None, typer.Option(help="output folder (default: the dataset's source folder)")] = None,
    days: Annotated[int, typer.Option(min=1, max=3650)] = 28,
    rows_per_day: Annotated[int, typer.Option(min=1)] = 1000,
    seed: int = 42,
    start: Annotated[str, typer.Option(help="first day, YYYY-MM-DD")] = "2026-01-01",
    fmt: Annotated[str, typer.Option("--format", help="parquet | csv")] = "parquet",
    covariate_drift: Annotated[float, typer.Option(min=0, max=1)] = 0.0,
    concept_drift: Annotated[float, typer.Option(min=0, max=1)] = 0.0,
    drift_from_day: Annotated[int, typer.Option(min=0)] = 0,
    missing: Annotated[list[str] | None, typer.Option(help="COLUMN=SHARE set to null")] = None,
    out_of_range: Annotated[list[str] | None, typer.Option(help="COLUMN=SHARE pushed out of range")] = None,
    rename: Annotated[list[str] | None, typer.Option(help="OLD=NEW column rename")] = None,
    retype: Annotated[list[str] | None, typer.Option(help="COLUMN=string")] = None,
    labels: Annotated[bool, typer.Option("--labels", help="also write the outcome batches, labels_<arrival date>, "
                                         "apart from the feature batches")] = False,
    labels_out: Annotated[Path | None, typer.Option(help="folder of the outcome batches (default: the dataset's "
                                                    "outcomes.source when --out is not given, else <out>_labels)")
                          ] = None,
    profile: ProfileOpt = None,
    config_dir: ConfigDirOpt = None,
) -> None:
    """Write seeded synthetic churn batches, one file per day (with --labels: their outcome batches too)."""
    from datetime import date

    from flywheel.datagen import DriftSpec, FaultSpec, GeneratorSpec, write_batches, write_label_batches

    try:
        faults = FaultSpec(
            missing={k: float(v) for k, v in _pairs(missing, "--missing").items()},
            out_of_range={k: float(v) for k, v in _pairs(out_of_range, "--out-of-range").items()},
            rename=_pairs(rename, "--rename"),
            retype=_pairs(retype, "--retype"),
        )
        spec = GeneratorSpec(seed=seed, days=days, rows_per_day=rows_per_day, start=date.fromisoformat(start),
                             drift=DriftSpec(covariate=covariate_drift, concept=concept_drift),
                             faults=faults, drift_from_day=drift_from_day)
        if out is None:
            from flywheel.schemas import load_dataset

            settings = _settings(profile, config_dir)
            ds = load_dataset(settings.resolve(settings.dataset))
            out = settings.resolve(ds.source)
            if labels and labels_out is None and ds.outcomes is not None and ds.outcomes.source is not None:
                labels_out = settings.resolve(ds.outcomes.source)
        paths = write_batches(spec, out, fmt)
        if labels:
            labels_out = labels_out or out.parent / f"{out.name}_labels"
            label_paths = write_label_batches(spec, labels_out, fmt)
    except (ValueError, FlywheelError) as exc:
        _fail(exc)
    console.print(f"wrote {len(paths)} batch(es) of {rows_per_day} rows to {out}")
    if labels:
        console.print(f"wrote {len(label_paths)} outcome batch(es) to {labels_out}")


def _pairs(items: list[str] | None, flag: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise ValueError(f"{flag} expects KEY=VALUE, got {item!r}")
        out[key] = value
    return out


@outcomes_app.command("ingest")
def outcomes_ingest(
    files: Annotated[list[Path], typer.Argument(help="outcome batch files (parquet or CSV)")],
    dataset: DatasetOpt = None,
    profile: ProfileOpt = None,
    config_dir: ConfigDirOpt = None,
) -> None:
    """Validate outcome (label) batches and store them in flywheel_outcomes; a failing batch is quarantined.

    Re-ingesting a batch with the same content adds nothing. Exit 2 at the first batch that fails."""
    from flywheel.outcomes import ingest_outcome_file
    from flywheel.schemas import load_dataset

    try:
        settings = _settings(profile, config_dir)
        ds = load_dataset(dataset if dataset and dataset.is_file() else settings.resolve(dataset or settings.dataset))
        quarantine = settings.resolve(settings.paths.quarantine_dir)
        for path in files:
            report = ingest_outcome_file(path, ds, settings.audit_db_url, quarantine)
            verb = "already stored, nothing added" if report.skipped else f"{report.rows} outcome(s) stored"
            console.print(f"{path.name}: {verb} (batch {report.batch_id[:12]}; {report.total_rows} in total)",
                          soft_wrap=True)
    except FlywheelError as exc:
        _fail(exc)


@feature_app.command("apply")
def feature_apply(dataset: DatasetOpt = None, profile: ProfileOpt = None, config_dir: ConfigDirOpt = None) -> None:
    """Render the Feast repo for this profile and apply the dataset's (versioned) feature service."""
    from flywheel.featurestore import apply_definitions, open_store, render_repo
    from flywheel.schemas import load_dataset

    try:
        settings = _settings(profile, config_dir)
        ds = load_dataset(settings.resolve(dataset or settings.dataset))
        repo = render_repo(settings.stores, settings.paths.home)
        service = apply_definitions(open_store(repo), ds, settings.features.ttl_days,
                                    settings.resolve(settings.paths.offline_dir))
    except FlywheelError as exc:
        _fail(exc)
    console.print(f"feature service [bold]{service}[/] applied in {repo}")


@feature_app.command("materialize")
def feature_materialize(dataset: DatasetOpt = None, profile: ProfileOpt = None,
                        config_dir: ConfigDirOpt = None) -> None:
    """Load the offline store into the online store (full range first, incremental afterwards)."""
    from datetime import UTC, datetime

    from flywheel.featurestore import materialize_online, open_store, render_repo
    from flywheel.schemas import load_dataset

    try:
        settings = _settings(profile, config_dir)
        ds = load_dataset(settings.resolve(dataset or settings.dataset))
        repo = render_repo(settings.stores, settings.paths.home)
        report = materialize_online(open_store(repo), ds, settings.resolve(settings.paths.offline_dir),
                                    datetime.now(UTC))
    except FlywheelError as exc:
        _fail(exc)
    console.print(f"materialized: {report}")


@app.command("train")
def train(
    dataset: DatasetOpt = None,
    batch: Annotated[Path | None, typer.Option(help="one batch file to validate and ingest first")] = None,
    seed: Annotated[int | None, typer.Option(help="override train.seed")] = None,
    profile: ProfileOpt = None,
    config_dir: ConfigDirOpt = None,
) -> None:
    """Run the training pipeline: validate -> features -> train -> evaluate -> register."""
    from flywheel.runtime import start_run_context

    try:  # fail fast on bad input, before any Prefect server starts
        ctx = start_run_context(profile, config_dir, dataset, seed)
        if batch and not batch.is_file():
            raise FlywheelError(f"batch file not found: {batch}")
        if not batch and not ctx.source.exists():
            raise FlywheelError(
                f"dataset {ctx.dataset.name!r}: source {ctx.source} does not exist "
                "(run `flywheel data generate`, or point `source:` in the dataset YAML at your data)"
            )
    except FlywheelError as exc:
        _fail(exc)
    from flywheel.stack import use_active_stack

    if url := use_active_stack(ctx.settings):  # before Prefect is imported: it reads the env at import
        console.print(f"using the running stack at {url}")

    from flows.training import TrainingParams, training_pipeline

    params = TrainingParams(dataset=str(ctx.dataset_path), batch=str(batch) if batch else None,
                            seed=seed, profile=profile, config_dir=str(config_dir) if config_dir else None)
    try:
        result = training_pipeline(params)
    except FlywheelError as exc:
        _fail(exc)
    verdict = {"champion": "green", "challenger": "cyan", "rejected": "red"}[result.outcome]
    console.print(f"{result.model_name} v{result.version}: [bold {verdict}]{result.outcome}[/]"
                  + (f" (failed: {', '.join(result.failed_rules)})" if result.failed_rules else ""))


@app.command("reproduce")
def reproduce(model: str, version: str, profile: ProfileOpt = None, config_dir: ConfigDirOpt = None) -> None:
    """Re-train a registered version from its recorded lineage and compare the metrics."""
    from flywheel.reproduce import reproduce_version

    try:
        settings = _settings(profile, config_dir)
        report = reproduce_version(settings, model, version)
    except FlywheelError as exc:
        _fail(exc)
    console.print(report.summary())
    if not report.matches:
        raise typer.Exit(code=1)


@app.command("serve")
def serve(profile: ProfileOpt = None, config_dir: ConfigDirOpt = None,
          port: Annotated[int | None, typer.Option(min=1, max=65535, help="default: serve.port")] = None,
          host: Annotated[str | None, typer.Option(help="default: serve.host")] = None) -> None:
    """Start the online prediction service (FastAPI on uvicorn): /predict, /health, /metrics, /docs."""
    import os

    os.environ.setdefault("OMP_NUM_THREADS", "1")  # before numpy loads: single-threaded inference
    from flywheel.service import run

    try:
        run(profile=profile, config_dir=config_dir, port=port, host=host)
    except FlywheelError as exc:
        _fail(exc)


@app.command("demo")
def demo(profile: ProfileOpt = None, config_dir: ConfigDirOpt = None,
         days: Annotated[int, typer.Option(min=14)] = 28,
         rows_per_day: Annotated[int, typer.Option(min=100)] = 1000) -> None:
    """Generate data, then run the training pipeline twice so the second run meets a champion."""
    from flows.demo import run_demo

    try:
        run_demo(profile=profile, config_dir=config_dir, days=days, rows_per_day=rows_per_day, console=console)
    except FlywheelError as exc:
        _fail(exc)


@app.command("score")
def score(
    entities: Annotated[Path | None, typer.Option(help="parquet/CSV of entity ids (default: every entity)")] = None,
    at: Annotated[str | None, typer.Option(help="feature time, ISO 8601 with timezone (default: now)")] = None,
    alias: Annotated[str, typer.Option(help="registry alias of the model")] = "champion",
    skew_check: Annotated[bool, typer.Option("--skew-check", help="also compare online and offline features")] = False,
    dataset: DatasetOpt = None,
    profile: ProfileOpt = None,
    config_dir: ConfigDirOpt = None,
) -> None:
    """Batch-score entities with the aliased model (offline features at --at); writes one parquet file."""
    from pydantic import ValidationError

    from flows.batch_scoring import BatchScoringParams
    from flywheel.runtime import start_run_context
    from flywheel.scoring import read_entities

    try:  # fail fast on bad input, before any Prefect server starts
        ctx = start_run_context(profile, config_dir, dataset)
        if entities:
            read_entities(entities, ctx.dataset)
        params = BatchScoringParams(entities=str(entities) if entities else None, at=at, alias=alias,
                                    skew_check=skew_check, dataset=str(ctx.dataset_path), profile=profile,
                                    config_dir=str(config_dir) if config_dir else None)
    except ValidationError as exc:
        _fail(ValueError("; ".join(f"--{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())))
    except FlywheelError as exc:
        _fail(exc)

    from flows.batch_scoring import batch_scoring

    try:
        result = batch_scoring(params)
    except FlywheelError as exc:
        _fail(exc)
    console.print(f"{result.model_name} v{result.model_version}: scored {result.scored_rows} of {result.rows} "
                  f"entities at {result.feature_time.isoformat()} ({result.no_feature_rows} without features) "
                  f"-> {result.path}" + ("; no skew" if result.skew_passed else ""))


@app.command("up")
def up(profile: ProfileOpt = None, config_dir: ConfigDirOpt = None,
       mlflow_ui: Annotated[bool | None, typer.Option("--mlflow-ui/--no-mlflow-ui",
                                                      help="also start `mlflow ui` (default: stack.mlflow_ui)")] = None,
       ) -> None:
    """Start the local stack: Prefect server, served deployments, online service (idempotent)."""
    from flywheel import stack

    try:
        settings = _settings(profile, config_dir)
        report = stack.up(settings, profile, config_dir, mlflow_ui=mlflow_ui, echo=console.print)
    except FlywheelError as exc:
        _fail(exc)
    api = report.urls["api"]
    if report.started:
        took = ", ".join(f"{k} {v:.0f} s" for k, v in report.seconds.items() if k != "total")
        console.print(f"[bold green]stack up[/] in {report.seconds.get('total', 0):.0f} s ({took})")
    else:
        console.print("[bold]stack already running[/]")
    if "prefect" in report.urls:
        console.print(f"  Prefect UI   {report.urls['prefect']}")
    console.print(f"  Prefect API  {api}")
    if "service" in report.urls:
        console.print(f"  service      {report.urls['service']}  (/docs, /health, /metrics)")
    if "mlflow-ui" in report.urls:
        console.print(f"  MLflow UI    {report.urls['mlflow-ui']}")
    else:
        console.print("  MLflow UI    flywheel up --mlflow-ui, or: " + " ".join(stack.mlflow_ui_command(settings)),
                      markup=False, soft_wrap=True)
    console.print(f"  logs         {stack.pid_dir(settings)}/<name>.log")
    if (stack.pid_dir(settings) / stack.TOKEN_FILE).is_file():
        console.print(f"  admin token  export {settings.serve.admin_token_env}="
                      f"$(cat {stack.pid_dir(settings) / stack.TOKEN_FILE})", markup=False, soft_wrap=True)
    console.print(f"`flywheel train` / `flywheel demo` use this server while it runs; other Prefect clients: "
                  f"export PREFECT_API_URL={api}", markup=False, soft_wrap=True)
    console.print("stop it with: flywheel down" + (f" --config-dir {config_dir}" if config_dir else ""), markup=False)


@app.command("down")
def down(profile: ProfileOpt = None, config_dir: ConfigDirOpt = None) -> None:
    """Stop exactly the processes `flywheel up` started (by pid) and remove their pid files."""
    from flywheel import stack

    try:
        stack.down(_settings(profile, config_dir), echo=console.print)
    except FlywheelError as exc:
        _fail(exc)


@app.command("status")
def status(profile: ProfileOpt = None, config_dir: ConfigDirOpt = None) -> None:
    """What `flywheel up` started: pid, URL, running, healthy. Exit 1 if any recorded process is down."""
    from flywheel import stack

    try:
        rows = stack.status(_settings(profile, config_dir))
    except FlywheelError as exc:
        _fail(exc)
    if not rows:
        console.print("stack not running (`flywheel up` starts it)")
        raise typer.Exit(code=1)
    for row in rows:
        word, color = ("healthy", "green") if row.healthy else ("not ready", "yellow")
        word, color = (word, color) if row.running else ("gone", "red")
        console.print(f"{row.name:<12} pid {row.pid:<8} [{color}]{word:<10}[/] {row.url or '':<26} {row.detail}",
                      soft_wrap=True)
    if not all(r.running for r in rows):
        raise typer.Exit(code=1)


# ------------------------------------------------------------------------------------------ rollout
rollout_app = typer.Typer(help="Staged rollouts of the challenger (canary, shadow, blue/green, A/B).",
                          no_args_is_help=True)
app.add_typer(rollout_app, name="rollout")
ModelOpt = Annotated[str | None, typer.Option("--model", help="registered model (default: serve/register name)")]


def _rollout_model(settings, model: str | None) -> str:
    from flywheel.schemas import load_dataset

    return model or settings.serve.model_name or settings.register_.model_name or load_dataset(
        settings.resolve(settings.dataset)).name


def _user() -> str:
    import getpass

    return f"user:{getpass.getuser()}"


@rollout_app.command("status")
def rollout_status_cmd(model: ModelOpt = None, profile: ProfileOpt = None, config_dir: ConfigDirOpt = None,
                       entries: Annotated[int, typer.Option(min=1, help="audit entries shown")] = 5) -> None:
    """Aliases, the service's routing, the rollout lock and the last audit entries."""
    from tasks.rollout import rollout_status

    try:
        settings = _settings(profile, config_dir)
        status = rollout_status(settings, _rollout_model(settings, model), entries)
    except FlywheelError as exc:
        _fail(exc)
    print(json.dumps(status, indent=2, default=str))


@rollout_app.command("start")
def rollout_start_cmd(model: ModelOpt = None, profile: ProfileOpt = None, config_dir: ConfigDirOpt = None,
                      strategy: Annotated[str | None, typer.Option(help="plan name in rollout.plan_file")] = None,
                      version: Annotated[str | None, typer.Option(help="challenger version")] = None) -> None:
    """Run the rollout flow (the service must be running with its admin token set)."""
    from flows.rollout import RolloutParams, rollout

    params = RolloutParams(model_name=model, challenger_version=version, strategy=strategy, profile=profile,
                           config_dir=str(config_dir) if config_dir else None)
    try:
        state = rollout(params, return_state=True)
        decision = state.result()
    except FlywheelError as exc:
        _fail(exc)
    console.print(f"{state.name}: {decision.reason}")


@rollout_app.command("promote")
def rollout_promote_cmd(model: ModelOpt = None, profile: ProfileOpt = None, config_dir: ConfigDirOpt = None,
                        version: Annotated[str | None, typer.Option(help="default: the challenger")] = None,
                        reason: Annotated[str, typer.Option(help="recorded in the audit log")] = "manual promotion",
                        ) -> None:
    """Promote now (instant, audited with you as the actor), then reload the service."""
    from tasks.rollout import manual_promote

    try:
        settings = _settings(profile, config_dir)
        console.print(manual_promote(settings, _rollout_model(settings, model), version, _user(), reason))
    except FlywheelError as exc:
        _fail(exc)


@rollout_app.command("rollback")
def rollout_rollback_cmd(model: ModelOpt = None, profile: ProfileOpt = None, config_dir: ConfigDirOpt = None,
                         to_previous: Annotated[bool, typer.Option(
                             "--to-previous", help="revert the last promotion instead of dropping the challenger")
                         ] = False,
                         reason: Annotated[str, typer.Option(help="recorded in the audit log")] = "manual rollback",
                         ) -> None:
    """Instant rollback (audited): routing single, challenger dropped (or champion back to the previous)."""
    from tasks.rollout import manual_rollback

    try:
        settings = _settings(profile, config_dir)
        console.print(manual_rollback(settings, _rollout_model(settings, model), _user(), reason, to_previous))
    except FlywheelError as exc:
        _fail(exc)


def main() -> None:  # pragma: no cover - console entry
    sys.exit(app())
