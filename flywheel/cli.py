"""The `flywheel` command line. Heavy libraries are imported inside each command, never at start."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

from flywheel.errors import FlywheelError

if TYPE_CHECKING:
    from flywheel.demo_story import DemoStory

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


# what prefect.server.api.server.SubprocessASGIServer.start raises when its server does not answer in time
EPHEMERAL_TIMEOUT_MESSAGE = "Timed out while attempting to connect to ephemeral Prefect API server"


def ephemeral_timeout_advice(exc: BaseException) -> str | None:
    """What to do when Prefect's ephemeral server did not start in time; None for any other error."""
    from flywheel.settings import EPHEMERAL_STARTUP_TIMEOUT_VAR

    if not isinstance(exc, RuntimeError) or EPHEMERAL_TIMEOUT_MESSAGE not in str(exc):
        return None
    waited = os.environ.get(EPHEMERAL_STARTUP_TIMEOUT_VAR, "Prefect's default")
    return (f"Prefect's temporary (ephemeral) API server did not start in time ({EPHEMERAL_STARTUP_TIMEOUT_VAR}"
            f"={waited}); a busy machine starts it slowly. Either start the local stack first with "
            "`flywheel up` (runs then use its server and nothing waits for a temporary one), or raise the "
            "timeout: the setting stack.ephemeral_startup_timeout_seconds (configs/<profile>.yaml), e.g. "
            f"FLYWHEEL_STACK__EPHEMERAL_STARTUP_TIMEOUT_SECONDS=600 (an explicit {EPHEMERAL_STARTUP_TIMEOUT_VAR} "
            "in the environment overrides it).")


@contextmanager
def prefect_start_advice() -> Iterator[None]:
    """Around a flow call: Prefect's ephemeral-server timeout becomes advice and exit code 2, no traceback."""
    try:
        yield
    except RuntimeError as exc:
        advice = ephemeral_timeout_advice(exc)
        if advice is None:
            raise
        _fail(FlywheelError(advice))


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
    from flywheel.stack import project_clock

    try:
        settings = _settings(profile, config_dir)
        ds = load_dataset(dataset if dataset and dataset.is_file() else settings.resolve(dataset or settings.dataset))
        quarantine = settings.resolve(settings.paths.quarantine_dir)
        clock = project_clock(settings)  # the running stack's, else the settings': the volume trigger counts by it
        for path in files:
            report = ingest_outcome_file(path, ds, settings.audit_db_url, quarantine, clock.now())
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
    from flywheel.featurestore import materialize_online, open_store, render_repo
    from flywheel.schemas import load_dataset
    from flywheel.stack import project_clock

    try:
        settings = _settings(profile, config_dir)
        ds = load_dataset(settings.resolve(dataset or settings.dataset))
        repo = render_repo(settings.stores, settings.paths.home)
        report = materialize_online(open_store(repo), ds, settings.resolve(settings.paths.offline_dir),
                                    project_clock(settings).now())  # up to the project's now
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
        with prefect_start_advice():
            result = training_pipeline(params)
    except FlywheelError as exc:
        _fail(exc)
    verdict = {"champion": "green", "challenger": "cyan", "queued": "yellow", "stale": "yellow",
               "duplicate": "yellow", "rejected": "red"}[result.outcome]
    console.print(f"{result.model_name} v{result.version}: [bold {verdict}]{result.outcome}[/]"
                  + (f" (failed: {', '.join(result.failed_rules)})" if result.failed_rules else "")
                  + (" (see `flywheel rollout status`)" if result.outcome in ("queued", "stale") else ""))


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
         days: Annotated[int, typer.Option(
             min=15, help="days of data; the first model gets all but the last 7, and needs a day beyond its "
             "7-day holdout")] = 28,
         rows_per_day: Annotated[int, typer.Option(min=100)] = 1000) -> None:
    """Generate data, train a champion, a challenger (rolled out on a running stack) and a sabotaged
    candidate; exit 1 naming each step whose expected outcome did not happen."""
    from flows.demo import run_demo

    try:
        with prefect_start_advice():
            story = run_demo(profile=profile, config_dir=config_dir, days=days, rows_per_day=rows_per_day,
                             console=console)
    except FlywheelError as exc:
        _fail(exc)
    demo_verdict(story)


def demo_verdict(story: DemoStory) -> None:
    """Print the verdict on the demo's story; exit 1 when an expected outcome did not happen."""
    from flows.demo import report_story

    if report_story(console, story):
        raise typer.Exit(code=1)


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

    from flywheel.runtime import start_run_context
    from flywheel.scoring import read_entities

    try:  # fail fast on bad input, before any Prefect server starts
        ctx = start_run_context(profile, config_dir, dataset)
        from flows.batch_scoring import BatchScoringParams  # after the settings: Prefect reads the env at import

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
        with prefect_start_advice():
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
    """Start the local stack: Prefect server, served deployments, online service, webhook receiver (idempotent)."""
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
    if "webhook" in report.urls:
        console.print(f"  webhook      {report.urls['webhook']}  (POST /hooks/retrain; test it: flywheel webhook sign)",
                      markup=False, soft_wrap=True)
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


@app.command("deploy")
def deploy_cmd(profile: ProfileOpt = None, config_dir: ConfigDirOpt = None,
               prefect_file: Annotated[Path | None, typer.Option(
                   "--prefect-file", help="deployments file (default: deployments/prefect.yaml)")] = None,
               ) -> None:
    """Register every deployment on the Prefect server (PREFECT_API_URL) for workers: creates the work pool,
    runs `prefect deploy --all`, adds crash detection. Then: prefect worker start --pool flywheel-process."""
    from flywheel import deploy

    try:
        report = deploy.deploy(_settings(profile, config_dir), prefect_file or deploy.DEPLOYMENTS_FILE,
                               echo=lambda m: console.print(m, markup=False, soft_wrap=True))
    except FlywheelError as exc:
        _fail(exc)
    console.print(f"[bold green]{len(report.deployments)} deployment(s) registered[/] on {report.api_url}",
                  soft_wrap=True)
    for name in report.deployments:
        console.print(f"  {name}", markup=False)
    console.print(f"crash detection: automation {report.crash_automation_id}", markup=False)
    pools = sorted(set(deploy.read_work_pools(prefect_file or deploy.DEPLOYMENTS_FILE)))
    for pool in pools:
        console.print(f"run them with: prefect worker start --pool {pool}   (PREFECT_API_URL={report.api_url}, "
                      "FLYWHEEL_HOME=<this checkout>)", markup=False, soft_wrap=True)


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
    from flywheel.clock import build_clock, describe_clock

    try:
        settings = _settings(profile, config_dir)
        rows = stack.status(settings)
        recorded = stack.read_clock(stack.pid_dir(settings))
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
    if recorded is not None:  # the time the stack's own logic runs on (Prefect's runs stay on wall time)
        console.print(f"{'clock':<12} {describe_clock(build_clock(recorded))}", soft_wrap=True, highlight=False)
    if not all(r.running for r in rows):
        raise typer.Exit(code=1)


# ------------------------------------------------------------------------------------------ webhook
webhook_app = typer.Typer(help="The webhook receiver: HMAC-signed deliveries in, Prefect events out.")
app.add_typer(webhook_app, name="webhook")


@webhook_app.callback(invoke_without_command=True)
def webhook(ctx: typer.Context, profile: ProfileOpt = None, config_dir: ConfigDirOpt = None,
            port: Annotated[int | None, typer.Option(min=1, max=65535, help="default: webhook.port")] = None,
            host: Annotated[str | None, typer.Option(help="default: webhook.host")] = None) -> None:
    """Serve the receiver: POST /hooks/retrain | data-landed | labels-landed, GET /health, /metrics.

    Needs the shared secret in the variable named by webhook.secret_env, and a Prefect server (PREFECT_API_URL,
    stores.prefect_api_url, or the running `flywheel up` stack)."""
    if ctx.invoked_subcommand is not None:
        return
    from flywheel import stack
    from flywheel.webhook import serve as serve_webhook

    try:
        settings = _settings(profile, config_dir)
        serve_webhook(settings, host, port, prefect_api_url=stack.active_api_url(settings))
    except FlywheelError as exc:
        _fail(exc)


@webhook_app.command("sign")
def webhook_sign(
    endpoint: Annotated[str, typer.Option(help="retrain | data-landed | labels-landed")],
    body: Annotated[str, typer.Option(help="the JSON body exactly as it will be sent, or @FILE")],
    secret_env: Annotated[str | None, typer.Option(help="variable holding the secret (default: webhook.secret_env)")]
    = None,
    delivery: Annotated[str | None, typer.Option(help="delivery id (default: a new one); reuse it to retry")] = None,
    url: Annotated[str | None, typer.Option(help="receiver URL (default: http://webhook.host:webhook.port)")] = None,
    check: Annotated[bool, typer.Option("--check/--no-check", help="refuse a body the endpoint would refuse")] = True,
    profile: ProfileOpt = None,
    config_dir: ConfigDirOpt = None,
) -> None:
    """Print the signature headers for one delivery, and a curl command that sends it (valid for
    webhook.tolerance_s seconds: sign again to retry later, with the same --delivery)."""
    import os
    import shlex
    import time
    import uuid

    from flywheel.hmacsig import DELIVERY_HEADER, SIGNATURE_HEADER, check_delivery_id, signature_header

    try:
        settings = _settings(profile, config_dir)
        raw = _sign_body(body)
        _check_hook_body(endpoint, raw, check)
        name = secret_env or settings.webhook.secret_env
        secret = os.environ.get(name)
        if not secret:
            raise FlywheelError(f"no secret to sign with: the environment variable {name} is not set")
        delivery_id = check_delivery_id(delivery or f"cli-{uuid.uuid4()}")
        signature = signature_header([secret], int(time.time()), delivery_id, raw)
    except (FlywheelError, ValueError) as exc:
        _fail(exc)
    base = url or f"http://{settings.webhook.host}:{settings.webhook.port}"
    data = body if body.startswith("@") else raw.decode()
    print(f"{DELIVERY_HEADER}: {delivery_id}")
    print(f"{SIGNATURE_HEADER}: {signature}")
    print()
    print(" ".join(["curl", "-sS", "-i", "-X", "POST", shlex.quote(f"{base.rstrip('/')}/hooks/{endpoint}"),
                    "-H", shlex.quote("Content-Type: application/json"),
                    "-H", shlex.quote(f"{DELIVERY_HEADER}: {delivery_id}"),
                    "-H", shlex.quote(f"{SIGNATURE_HEADER}: {signature}"),
                    "--data-binary", shlex.quote(data)]))
    console.print(f"valid for {settings.webhook.tolerance_s} s (webhook.tolerance_s); a retry of this delivery "
                  f"keeps --delivery {delivery_id} and is signed again", markup=False, soft_wrap=True)


def _sign_body(body: str) -> bytes:
    """The exact bytes to sign: the option's text, or a file's bytes for @FILE (curl's convention)."""
    if body.startswith("@"):
        path = Path(body[1:])
        if not path.is_file():
            raise FlywheelError(f"--body {body}: file not found")
        return path.read_bytes()
    return body.encode()


def _check_hook_body(endpoint: str, raw: bytes, check_body: bool) -> None:
    from pydantic import ValidationError

    from flywheel.webhook import HOOKS, body_problems

    hook = HOOKS.get(endpoint)
    if hook is None:
        raise FlywheelError(f"--endpoint {endpoint!r}: one of {', '.join(HOOKS)}")
    if not check_body:
        return
    try:
        hook.body.model_validate_json(raw)
    except ValidationError as exc:
        raise FlywheelError(f"--body: the receiver would answer 422: {'; '.join(body_problems(exc))} "
                            "(--no-check signs it anyway)") from None


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


# --------------------------------------------------------------------------------------- monitoring
EXIT_DRIFT_ALARM = 3  # the drift alarm is raised (after persistence)
EXIT_DATA_QUALITY = 4  # a data-quality alarm and no drift alarm


def _when(value: str | None, flag: str):
    from datetime import UTC, datetime

    if value is None:
        return None
    try:
        dt = datetime.fromisoformat(value)
    except ValueError:
        raise FlywheelError(f"{flag} expects an ISO 8601 time, got {value!r}") from None
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)


@app.command("monitor")
def monitor(
    current: Annotated[Path, typer.Option("--current", "-c", help="the batch to judge (parquet or CSV)")],
    reference: Annotated[str | None, typer.Option(
        help="registry alias or version whose stored profile is the reference (default: champion), "
             "or a profile JSON file")] = None,
    reference_data: Annotated[Path | None, typer.Option(
        "--reference-data", help="profile this data file as the reference instead")] = None,
    model: ModelOpt = None,
    prediction_column: Annotated[str | None, typer.Option(
        help="the batch's column of P(positive) (default: the referenced model scores the batch)")] = None,
    window_start: Annotated[str | None, typer.Option(help="ISO time (default: the batch's first timestamp)")] = None,
    window_end: Annotated[str | None, typer.Option(help="ISO time (default: the batch's last timestamp)")] = None,
    report: Annotated[bool | None, typer.Option("--report/--no-report",
                                                help="write the Evidently HTML report (default: the policy's)")] = None,
    dataset: DatasetOpt = None,
    profile: ProfileOpt = None,
    config_dir: ConfigDirOpt = None,
) -> None:
    """Judge one batch for drift and data quality against a reference profile; record it in the history.

    Exit 0: no alarm; 3: the drift alarm is raised (after persistence over the recorded windows); 4: a
    data-quality alarm (never a drift alarm); 2: bad input. Call it once per batch, in time order."""
    from flywheel.monitoring.batch import batch_performance, prepare_batch
    from flywheel.monitoring.config import load_policy
    from flywheel.monitoring.history import MonitoringHistory
    from flywheel.monitoring.window import monitor_window
    from flywheel.schemas import load_dataset
    from flywheel.stack import project_clock

    try:
        settings = _settings(profile, config_dir)
        ds = load_dataset(settings.resolve(dataset or settings.dataset))
        policy_file = settings.resolve(settings.monitor.policy_file)
        policy = load_policy(policy_file).for_dataset(ds.name)
        name = model or settings.register_.model_name or ds.name
        batch = prepare_batch(current, ds, name, reference=reference, reference_data=reference_data,
                              tracking_uri=settings.mlflow_tracking_uri, audit_db_url=settings.audit_db_url,
                              prediction_column=prediction_column, start=_when(window_start, "--window-start"),
                              end=_when(window_end, "--window-end"))
        policy.check_columns(batch.profile.numeric_features, batch.profile.categorical_features, str(policy_file))
        report_path = None
        if policy.report.enabled if report is None else report:
            series = batch.reference.replace(":", "-")
            folder = settings.resolve(settings.paths.reports_dir) / "monitoring" / name / series
            report_path = folder / f"{batch.start:%Y%m%dT%H%M%S}_{batch.end:%Y%m%dT%H%M%S}.html"
        perf = batch_performance(batch, ds, policy.performance.n_boot, policy.performance.confidence,
                                 settings.train.seed)
        history = MonitoringHistory(settings.audit_db_url)
        try:
            done = monitor_window(batch.profile, batch.window, policy, history, model=name, version=batch.version,
                                  reference=batch.reference, start=batch.start, end=batch.end,
                                  predictions=batch.predictions, dataset=ds, validate_cfg=settings.validate_,
                                  report_path=report_path, estimate=perf.estimate,
                                  judged_at=project_clock(settings).now())  # the loop's liveness reads it
        finally:
            history.close()
    except FlywheelError as exc:
        _fail(exc)
    _print_window(batch, done, policy, perf)
    verdict = done.assessment.verdict
    if verdict.alarm:
        raise typer.Exit(code=EXIT_DRIFT_ALARM)
    if verdict.data_quality_alarm:
        raise typer.Exit(code=EXIT_DATA_QUALITY)


def _print_window(batch, done, policy, perf=None) -> None:
    import shutil

    from rich.table import Table

    out = Console(width=max(140, shutil.get_terminal_size().columns), soft_wrap=True)
    a, v = done.assessment, done.assessment.verdict
    quality = {f.column: f for f in a.quality.features}
    table = Table(title=f"{batch.model} vs {batch.reference_label}: {batch.start:%Y-%m-%d %H:%M} - "
                        f"{batch.end:%Y-%m-%d %H:%M} UTC, {v.rows} rows")
    for col in ("feature", "method", "score", "threshold", "drift", "missing (ref)", "out of range", "new categories"):
        table.add_column(col, justify="right" if col in ("score", "threshold", "out of range") else "left")
    for c in [*a.drift.columns, *([a.drift.prediction] if a.drift.prediction else [])]:
        q = quality.get(c.column)
        if c.column == "prediction":
            flag = "[red]drift[/]" if v.prediction_drifted else "no"
        elif c.column in v.drifted_features:
            flag = "[red]drift[/]" + (" (key)" if c.column in v.key_features_drifted else "")
        elif c.drifted:
            flag = "[yellow]not after FDR[/]"
        else:
            flag = c.note or "no"
        missing = (f"{q.missing_share:.1%} ({q.reference_missing_share:.1%})" if q and q.missing_share is not None
                   else "-")
        table.add_row(c.column, c.method, "-" if c.score is None else f"{c.score:.4f}", f"{c.threshold:g}", flag,
                      missing, str(q.out_of_range) if q else "-", ", ".join(q.new_categories) if q else "-")
    out.print(table)
    status = {"drift": "[red]drifted[/]", "ok": "[green]no drift[/]", "too_few_rows": "[yellow]too few rows[/]"}
    out.print(f"window: {status[v.status]}; {len(v.drifted_features)} of {v.judged_features} features drifted "
              f"({v.share_drifted:.0%}, dataset drift at {policy.alarm.drift_share:.0%}); "
              f"streak {v.streak} of {v.persistence}")
    for reason in v.reasons:
        out.print(f"  - {reason}", markup=False)
    if batch.prediction_note:
        out.print(f"  prediction drift not judged: {batch.prediction_note}", markup=False)
    out.print("[bold red]DRIFT ALARM RAISED[/]" if v.alarm else "drift alarm: [green]not raised[/]")
    if v.data_quality_alarm:
        out.print("[bold red]DATA-QUALITY ALARM[/] (not a drift alarm, not a reason to retrain):")
    elif v.data_quality_problems:
        out.print("data-quality problems (not an alarm: too few rows):")
    for problem in v.data_quality_problems:
        out.print(f"  - {problem}", markup=False)
    if perf is not None and perf.estimate is not None:
        for line in _performance_lines(perf):
            out.print(line, markup=False)
    if done.report_path:
        out.print(f"report: {done.report_path}", markup=False)
    if done.report_error:
        out.print(f"report failed: {done.report_error}", markup=False)
    out.print(f"recorded as window {done.record.id} of series {batch.model} / {batch.reference}", markup=False)


def _performance_lines(perf) -> list[str]:
    """The estimate of the batch's predictions, and the realized figures beside it when it carries labels."""
    est = perf.estimate
    r, a = est.roc_auc, est.accuracy
    lines = [f"performance estimated without labels ({est.n} rows): ROC AUC {r.value:.3f} [{r.lower:.3f}, "
             f"{r.upper:.3f}], accuracy {a.value:.3f} [{a.lower:.3f}, {a.upper:.3f}]"]
    if perf.realized is None:
        lines.append("performance realized: the batch carries no labels")
    else:
        real, err = perf.realized, perf.error
        auc = "n/a (one class)" if real.roc_auc != real.roc_auc else f"{real.roc_auc:.3f}"
        lines.append(f"performance realized on its {perf.labelled} labelled rows: ROC AUC {auc} (estimate on the same "
                     f"rows off by {err.roc_auc.error:+.3f}), accuracy {real.accuracy:.3f} (off by "
                     f"{err.accuracy.error:+.3f})")
    return lines


@rollout_app.command("supersede")
def rollout_supersede_cmd(model: ModelOpt = None, profile: ProfileOpt = None, config_dir: ConfigDirOpt = None,
                          version: Annotated[str | None, typer.Option(
                              help="the version to roll out instead (default: the newest queued)")] = None,
                          reason: Annotated[str, typer.Option(help="recorded in the audit log")] = "superseded by hand",
                          ) -> None:
    """Stop the rollout in flight, send traffic back to the champion, and make a queued version the challenger
    (its rollout starts through the challenger-registered event). Audited with you as the actor."""
    from flywheel.stack import use_active_stack

    try:
        settings = _settings(profile, config_dir)
        use_active_stack(settings)  # before Prefect is imported: the event goes to the running stack
        from tasks.rollout import manual_supersede

        console.print(manual_supersede(settings, _rollout_model(settings, model), version, _user(), reason),
                      markup=False, soft_wrap=True)
    except FlywheelError as exc:
        _fail(exc)


# --------------------------------------------------------------------------------------------- loop
loop_app = typer.Typer(help="Pause and resume the continuous-training loop (automatic challenger moves and "
                       "promotions; triggers are recorded as suppressed while paused); check it is alive.",
                       no_args_is_help=True)
app.add_typer(loop_app, name="loop")


@loop_app.command("pause")
def loop_pause_cmd(reason: Annotated[str, typer.Option(help="why (recorded with you and the time)")],
                   model: ModelOpt = None, profile: ProfileOpt = None, config_dir: ConfigDirOpt = None) -> None:
    """Pause the loop: candidates are queued instead of becoming challenger, rollouts hold instead of
    promoting. `flywheel rollout promote|rollback|start` still work."""
    from flywheel.loopcontrol import LoopControl
    from flywheel.stack import project_clock

    try:
        settings = _settings(profile, config_dir)
        name = _rollout_model(settings, model)
        # on the project clock: the loop's state is its latest event by time
        state, recorded = LoopControl(settings.audit_db_url).pause(name, _user(), reason,
                                                                   project_clock(settings).now())
    except (FlywheelError, ValueError) as exc:
        _fail(exc)
    console.print(state.describe() if recorded else f"already paused, nothing recorded: {state.describe()}",
                  markup=False, soft_wrap=True)


@loop_app.command("resume")
def loop_resume_cmd(model: ModelOpt = None, profile: ProfileOpt = None, config_dir: ConfigDirOpt = None,
                    reason: Annotated[str, typer.Option(help="recorded with you and the time")] = "resumed",
                    ) -> None:
    """Resume the loop, then hand the challenger queue off (the newest queued version becomes challenger
    and its rollout starts) unless a rollout is in flight."""
    from flywheel.loopcontrol import LoopControl
    from flywheel.stack import project_clock, use_active_stack

    try:
        settings = _settings(profile, config_dir)
        name = _rollout_model(settings, model)
        actor = _user()
        state, recorded = LoopControl(settings.audit_db_url).resume(name, actor, reason,
                                                                    project_clock(settings).now())
        console.print(state.describe() + ("" if recorded else " (was not paused; nothing recorded)"),
                      markup=False, soft_wrap=True)
        use_active_stack(settings)  # before Prefect is imported: a released version's event goes to the stack
        from tasks.rollout import hand_off_and_announce

        done = hand_off_and_announce(settings.mlflow_tracking_uri, settings.audit_db_url, name, actor,
                                     f"loop resumed by {actor}", project_clock(settings))
    except FlywheelError as exc:
        _fail(exc)
    if done["released"]:
        console.print(f"queued v{done['released']} is {done['alias']}; "
                      + (f"event {done['event']} emitted" if done["event"] else
                         f"no Prefect API for its event: `flywheel rollout start --version {done['released']}`"),
                      markup=False, soft_wrap=True)
    else:
        console.print(f"queue: {done['skipped']}", markup=False, soft_wrap=True)


@loop_app.command("check")
def loop_check_cmd(model: ModelOpt = None, profile: ProfileOpt = None, config_dir: ConfigDirOpt = None) -> None:
    """Is the loop alive? Prints how long since monitoring last judged a window and since an outcome last
    arrived, against the limits of configs/triggers.yaml `liveness`; exits 1 when either is over (for cron,
    outside Prefect: it reads only the project database), 2 when it cannot tell."""
    import sqlalchemy as sa

    from flywheel.clock import build_clock
    from flywheel.db import project_engine
    from flywheel.liveness import describe, read
    from flywheel.schemas import load_dataset
    from flywheel.trigger_policy import load_policy

    try:
        settings = _settings(profile, config_dir)
        name = _rollout_model(settings, model)
        dataset = load_dataset(settings.resolve(settings.dataset)).name
        policy = load_policy(settings.resolve(settings.triggers.policy_file)).liveness
        now = build_clock(settings.clock).now()
        engine = None
        try:
            engine = project_engine(settings.audit_db_url, "project database")
            with engine.connect() as conn:
                loop = read(conn, name, dataset, now, policy)
        except (sa.exc.SQLAlchemyError, OSError) as exc:
            where = sa.engine.make_url(settings.audit_db_url).render_as_string(hide_password=True)
            raise FlywheelError(f"project database {where}: cannot be read "
                                f"({type(exc).__name__}: {str(exc).splitlines()[0]})") from None
        finally:
            if engine is not None:
                engine.dispose()
    except FlywheelError as exc:
        _fail(exc)
    since = f"champion since {loop.champion_since.isoformat(timespec='seconds')}" if loop.champion_since else \
        "never champion"
    print(f"model {loop.model} (dataset {loop.dataset}, {since}) at {now.isoformat(timespec='seconds')}")
    for s in (loop.monitoring, loop.outcomes):
        noun = "monitoring (last judged window)" if s.what == "monitoring" else "outcomes (last arrival)"
        last = s.last_at.isoformat(timespec="seconds") if s.last_at else "none recorded"
        print(f"  {noun:32} {last:26} age {describe(s):>8}  limit {s.limit_s / 3600:.1f} h  "
              f"{'SILENT' if s.silent else 'ok'}")
    if loop.silent:
        for line in loop.summaries:
            print(f"silent: {line}")
        raise typer.Exit(code=1)
    print("loop alive")


@loop_app.command("status")
def loop_status_cmd(model: ModelOpt = None, profile: ProfileOpt = None, config_dir: ConfigDirOpt = None,
                    entries: Annotated[int, typer.Option(min=1, help="pauses/resumes shown")] = 5) -> None:
    """Paused or running (by whom, since when, why), the last pauses and resumes, the queued versions."""
    from flywheel.audit import AuditLog
    from flywheel.challenger_queue import queued_versions
    from flywheel.loopcontrol import LoopControl
    from flywheel.registry import Registry

    try:
        settings = _settings(profile, config_dir)
        name = _rollout_model(settings, model)
        loop = LoopControl(settings.audit_db_url)
        registry = Registry(settings.mlflow_tracking_uri, AuditLog(settings.audit_db_url))
        out = {**loop.state(name).model_dump(mode="json"),
               "history": [e.model_dump(mode="json") for e in loop.history(name)[-entries:]],
               "queued": [q.model_dump() for q in queued_versions(registry, name)]}
    except FlywheelError as exc:
        _fail(exc)
    print(json.dumps(out, indent=2, default=str))


# ----------------------------------------------------------------------------------------- triggers
triggers_app = typer.Typer(help="Trigger decisions: when the loop retrains on its own, and why not.",
                           no_args_is_help=True)
app.add_typer(triggers_app, name="triggers")


def _trained_model(settings, model: str | None) -> str:
    """The model the training deployment registers (register.model_name, else the dataset's name); --model may
    only repeat it: the deployment's trigger trains its own model whatever the event names."""
    from flywheel.schemas import load_dataset

    trained = settings.register_.model_name or load_dataset(settings.resolve(settings.dataset)).name
    if model is not None and model != trained:
        raise FlywheelError(f"the training deployment here trains {trained!r}, not {model!r}: a request for "
                            f"{model!r} would retrain {trained!r} (set register.model_name or the dataset to "
                            "train another model)")
    return trained


@app.command("retrain")
def retrain(
    reason: Annotated[str, typer.Option(help="why: recorded with the decision, and the training run's reason")],
    model: Annotated[str | None, typer.Option("--model", help="registered model (default: the one trained here)")
                     ] = None,
    request_id: Annotated[str | None, typer.Option(
        help="an id for this request: repeating it is recognised as a duplicate (default: a fresh one)")] = None,
    wait: Annotated[float, typer.Option(min=0, help="seconds to wait for the training run it starts (0: don't)")
                    ] = 15.0,
    profile: ProfileOpt = None,
    config_dir: ConfigDirOpt = None,
) -> None:
    """Ask for a retrain now: an explicit request (no cooldown, no pause), decided, recorded and emitted as
    flywheel.retrain.requested, which the training deployment runs on (one run at a time, queued)."""
    import uuid

    from flywheel.stack import project_clock, use_active_stack
    from flywheel.trigger_policy import load_policy
    from flywheel.triggers import request_signal

    try:
        if not reason.strip():
            raise FlywheelError("--reason must say why (it is recorded)")
        settings = _settings(profile, config_dir)
        name = _trained_model(settings, model)
        policy = load_policy(settings.resolve(settings.triggers.policy_file))
        use_active_stack(settings)  # before Prefect is imported: it reads PREFECT_API_URL at import
        if not os.environ.get("PREFECT_API_URL"):
            raise FlywheelError("no Prefect server to carry the request: start the stack (`flywheel up`), or set "
                                "stores.prefect_api_url (or PREFECT_API_URL) to the server that serves the "
                                "training deployment")
    except FlywheelError as exc:
        _fail(exc)
    from tasks.triggers import decide_record_emit, link_started_run

    now = project_clock(settings).now()  # the running stack's clock, if it runs one
    signal = request_signal(model=name, reason=reason.strip(), actor=_user(), source="cli", occurred=now,
                            event_id=request_id or f"cli:{uuid.uuid4()}")
    decision = decide_record_emit(signal, policy, settings.audit_db_url, now, paused=False)
    from rich.markup import escape

    console.print(f"decision {decision.id}: [bold]{decision.outcome}[/] ({escape(decision.reason)})", highlight=False,
                  soft_wrap=True)
    if not decision.fired:
        raise typer.Exit(code=1)
    if decision.emitted_at is None:
        _fail(FlywheelError(f"the request was recorded as fired, but flywheel.retrain.requested could not be sent "
                            f"to {os.environ['PREFECT_API_URL']}; repeat the command with --request-id "
                            f"{signal.event_id} to send it again"))
    console.print(f"emitted flywheel.retrain.requested (event id {decision.id}) for flywheel.model.{name}",
                  soft_wrap=True)
    if wait > 0:
        run_id = link_started_run(decision.id, settings.audit_db_url, wait)
        if run_id:
            ui = os.environ["PREFECT_API_URL"].rstrip("/").removesuffix("/api")
            console.print(f"training run started: {ui}/runs/flow-run/{run_id}", soft_wrap=True)
        else:
            console.print(f"no training run seen within {wait:g} s: the training deployment's trigger starts it "
                          "when the deployment is served (`flywheel up`); `flywheel triggers list` shows it later")


@triggers_app.command("list")
def triggers_list(model: ModelOpt = None, limit: Annotated[int, typer.Option(min=1, max=1000)] = 20,
                  profile: ProfileOpt = None, config_dir: ConfigDirOpt = None) -> None:
    """The latest trigger decisions, fired and suppressed, with their reasons (newest first)."""
    from rich.table import Table

    from flywheel.trigger_decisions import TriggerDecisions

    try:
        settings = _settings(profile, config_dir)
        store = TriggerDecisions(settings.audit_db_url)
        rows = store.decisions(model, limit)
        store.dispose()
    except FlywheelError as exc:
        _fail(exc)
    table = Table("at", "model", "kind", "outcome", "reason", "run")
    for d in rows:
        table.add_row(d.at.isoformat(timespec="seconds"), d.model, d.kind, d.outcome, d.reason, d.flow_run_id or "")
    Console().print(table)


# --------------------------------------------------------------------------------------------- db
db_app = typer.Typer(help="The project's database schema: one migration step, run as the owner role.",
                     no_args_is_help=True)
app.add_typer(db_app, name="db")


@db_app.command("upgrade")
def db_upgrade(
    url: Annotated[str | None, typer.Option(help="the owner role's database URL (default: stores.owner_db_url, "
                                            "e.g. FLYWHEEL_STORES__OWNER_DB_URL; else stores.audit_db_url)")] = None,
    grant_to: Annotated[list[str] | None, typer.Option(
        "--grant-to", help="application role to grant row access to (repeatable; default: the users of the "
                           "project URLs on the same database, e.g. stores.audit_db_url's)")] = None,
    profile: ProfileOpt = None, config_dir: ConfigDirOpt = None,
) -> None:
    """Create or update the project's tables and the audit log's append-only triggers, and grant the
    application role INSERT/SELECT on the audit log (rows of the other tables). Idempotent."""
    from flywheel import migrations
    from flywheel.credentials import CredentialsError, require_credentials, url_problem

    try:
        settings = _settings(profile, config_dir)
        if url is None:
            require_credentials(settings, "migrations")
        elif settings.profile == "production" and (why := url_problem(url)):
            raise CredentialsError(f"the production profile refuses --url: the database URL {why}")
        owner_url = url or settings.owner_db_url
        roles = grant_to if grant_to is not None else migrations.application_roles(owner_url, settings.project_db_urls)
        report = migrations.upgrade_database(owner_url, roles)
    except FlywheelError as exc:
        _fail(exc)
    console.print(report.summary(), markup=False, soft_wrap=True)


# ------------------------------------------------------------------------------------ credentials
credentials_app = typer.Typer(help="Credentials: the production profile's refusal of empty or default secrets.",
                              no_args_is_help=True)
app.add_typer(credentials_app, name="credentials")


@credentials_app.command("check", context_settings={"allow_interspersed_args": False})
def credentials_check(
    component: Annotated[str, typer.Argument(help="service | webhook | flows | migrations | prefect-server | "
                                                  "mlflow-server | images (PostgreSQL, object store, Grafana)")],
    command: Annotated[list[str] | None, typer.Argument(
        help="after `--`: the server to become once the check passes (e.g. -- prefect server start ...)")] = None,
    profile: ProfileOpt = None, config_dir: ConfigDirOpt = None,
) -> None:
    """In the production profile, refuse (exit 2, naming each variable) when a credential COMPONENT reads is
    empty or a well-known default; then run COMMAND in this process's place, if given."""
    from flywheel.credentials import COMPONENTS, require_credentials

    if component not in COMPONENTS:
        _fail(FlywheelError(f"unknown component {component!r}; one of {', '.join(COMPONENTS)}"))
    try:
        settings = _settings(profile, config_dir)
        require_credentials(settings, component)  # type: ignore[arg-type]
    except FlywheelError as exc:
        _fail(exc)
    command = command[1:] if command and command[0] == "--" else command
    if not command:
        console.print(f"{component}: credentials fine for the {settings.profile} profile", markup=False)
        return
    os.execv(_program(command[0]), command)


def _program(name: str) -> str:
    """A program of this environment (beside the interpreter running Flywheel) first, else from PATH."""
    import shutil

    beside = Path(sys.executable).parent / name
    found = str(beside) if "/" not in name and beside.is_file() else shutil.which(name)
    if found is None:
        _fail(FlywheelError(f"no program {name!r} beside {sys.executable} or on PATH"))
    return str(found)


# ------------------------------------------------------------------------------------ objectstore
objectstore_app = typer.Typer(help="The S3-compatible store of MLflow's artifacts (production stack).",
                              no_args_is_help=True)
app.add_typer(objectstore_app, name="objectstore")


@objectstore_app.command("ensure-bucket")
def objectstore_ensure_bucket(
    bucket: Annotated[str, typer.Argument(help="bucket name (the s3://BUCKET of the MLflow server's "
                                               "--artifacts-destination)")],
    endpoint_url: Annotated[str | None, typer.Option(help="S3 API URL (default: MLFLOW_S3_ENDPOINT_URL)")] = None,
) -> None:
    """Create BUCKET unless it exists (keys from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY). Idempotent."""
    from flywheel.objectstore import ensure_bucket

    try:
        created = ensure_bucket(bucket, endpoint_url)
    except FlywheelError as exc:
        _fail(exc)
    console.print(f"bucket {bucket}: {'created' if created else 'exists'}", markup=False)


def main() -> None:  # pragma: no cover - console entry
    sys.exit(app())
