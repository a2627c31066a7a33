"""The one settings tree: `configs/base.yaml` + `configs/<profile>.yaml` + `FLYWHEEL_*` variables.

Each layer is parsed and checked on its own so that an error names the file (or variable) that
set the offending key; pydantic-settings' YAML source neither reports missing files nor names them.
Nothing here runs at import time: entry points call `load_settings()` once.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from flywheel.clock import ClockConfig, WallClockConfig
from flywheel.errors import ConfigError
from flywheel.trigger_policy import Cron

M = TypeVar("M", bound=BaseModel)
PROFILES = ("local", "ci", "production")
ENV_PREFIX = "FLYWHEEL_"
# FLYWHEEL_* variables that are not settings keys (the admin token and the webhook secrets are secrets:
# never in the settings tree, which only names the variables that hold them; FLYWHEEL_HOME is the code
# checkout a worker's runs start in, the pull step of deployments/prefect.yaml)
NOT_SETTINGS = frozenset({"FLYWHEEL_PROFILE", "FLYWHEEL_CONFIG_DIR", "FLYWHEEL_HOME", "FLYWHEEL_ADMIN_TOKEN",
                          "FLYWHEEL_WEBHOOK_SECRET", "FLYWHEEL_WEBHOOK_SECRET_PREVIOUS"})
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Prefect's variable for `stack.ephemeral_startup_timeout_seconds` (prefect.settings: server.ephemeral)
EPHEMERAL_STARTUP_TIMEOUT_VAR = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"


def secret_env_name(value: str) -> str:
    """The name of a variable that holds a secret: a valid name, and not a FLYWHEEL_* settings key (those
    are read as settings: the secret would fail the load as an unknown key, and be echoed in the error)."""
    if not ENV_NAME.fullmatch(value):
        raise ValueError(f"{value!r} is not an environment variable name")
    if value.startswith(ENV_PREFIX) and value not in NOT_SETTINGS:
        raise ValueError(f"{value!r}: FLYWHEEL_* variables are settings keys; name a variable without that "
                         "prefix (e.g. ALERTS_WEBHOOK_SECRET), or use the default")
    return value


class Section(BaseModel):
    """Strict, frozen config section: an unknown key or a wrong type fails at load."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class PathsConfig(Section):
    home: Path = Path(".")
    data_dir: Path = Path("data")
    incoming_dir: Path = Path("data/incoming")
    quarantine_dir: Path = Path("data/quarantine")
    offline_dir: Path = Path("data/offline")
    reports_dir: Path = Path("data/reports")


class FeastOnlineConfig(Section):
    type: Literal["sqlite", "redis"] = "sqlite"
    path: Path = Path("data/online_store.db")
    connection_string: str = "127.0.0.1:6379"


class StoresConfig(Section):
    prefect_api_url: str | None = None
    mlflow_tracking_uri: str = "sqlite:///{home}/data/mlflow.db"
    mlflow_artifact_location: str = "{home}/data/mlartifacts"
    audit_db_url: str = "sqlite:///{home}/data/flywheel.db"
    # the role that owns the project tables and runs `flywheel db upgrade` (production: PostgreSQL);
    # None: the upgrade runs with audit_db_url (the local profiles, where one SQLite file is everything)
    owner_db_url: str | None = None
    feast_repo: Path = Path("data/feature_repo")
    feast_registry: Path = Path("data/feast_registry.db")
    feast_offline: Literal["duckdb", "file"] = "duckdb"
    feast_online: FeastOnlineConfig = FeastOnlineConfig()


class MissingValuesConfig(Section):
    max_share: float = Field(0.30, ge=0.0, le=1.0)
    impute_excess: bool = False


class RowCountConfig(Section):
    min: int = Field(1, ge=0)
    max: int = Field(50_000_000, ge=1)


class ExtraExpectation(Section):
    """A Great Expectations expectation by class name, e.g. ExpectColumnValuesToBeUnique."""

    type: str
    kwargs: dict[str, Any] = {}


class ValidateConfig(Section):
    missing: MissingValuesConfig = MissingValuesConfig()
    row_count: RowCountConfig = RowCountConfig()
    extra_expectations: list[ExtraExpectation] = []
    sample_values: int = Field(5, ge=0, le=50)


class FeaturesConfig(Section):
    ttl_days: int = Field(90, ge=1)
    max_dropped_share: float = Field(0.01, ge=0.0, le=1.0)
    max_all_null_share: float = Field(0.01, ge=0.0, le=1.0)
    # the time of a training prediction: the label row's event time, or its arrival (created) time;
    # features count only if they had arrived by then either way (see flywheel/featurestore.py)
    prediction_time: Literal["event", "arrival"] = "event"
    # who executes the point-in-time join of the training set: "duckdb" runs Feast's semantics as a DuckDB
    # ASOF join over the views' parquet (flywheel/pitjoin.py, about 4x faster than Feast's own at 1M x 10M
    # rows, and bounded by join_memory_limit); "feast" calls get_historical_features on the offline store
    join_engine: Literal["duckdb", "feast"] = "duckdb"
    join_memory_limit: str = Field("2GB", pattern=r"^\d+(\.\d+)?\s*[KMGT]i?B$")


class ImputationConfig(Section):
    numeric: Literal["mean", "median", "knn"] = "median"
    categorical: Literal["most_frequent", "missing_category"] = "most_frequent"


class SearchConfig(Section):
    method: Literal["grid", "random", "bayesian"] = "random"
    trials: int = Field(6, ge=1, le=500)
    metric: Literal["roc_auc", "average_precision", "log_loss", "f1"] = "roc_auc"
    # bayesian only: trials drawn at random before TPE models the results (optuna's default, 10, would
    # make a small budget random search); None: max(1, trials // 3). Grid and random search ignore it.
    startup_trials: int | None = Field(None, ge=1)

    @field_validator("startup_trials")
    @classmethod
    def _startup_leaves_trials_to_model(cls, value: int | None, info: ValidationInfo) -> int | None:
        trials = info.data.get("trials")  # absent when trials itself was invalid (reported on its own)
        if value is not None and trials is not None and value >= trials:
            raise ValueError(
                f"startup_trials ({value}) must be smaller than trials ({trials}): otherwise TPE never "
                "proposes a trial and bayesian search is random search"
            )
        return value

    @property
    def n_startup_trials(self) -> int:
        """Random start-up trials of a bayesian search, per family."""
        return self.startup_trials if self.startup_trials is not None else max(1, self.trials // 3)


Family = Literal["logistic_regression", "hist_gradient_boosting", "random_forest"]


class ParallelismConfig(Section):
    """Where search trials (`train.parallelism`), batch-scoring partitions (`batch.parallelism`) or the windows of
    a monitoring backfill (`monitor.parallelism`) run: here one after another (the default), on a local Dask
    cluster of `workers` processes started for the work, or on an existing Dask cluster at `address`
    (tcp://host:8786), all through Prefect's Dask task runner. One thread per trial, partition or window."""

    workers: int = Field(0, ge=0, le=256)  # 0: serial, unless address is set
    address: str | None = None
    memory_limit: str | None = None  # per local worker, e.g. "2GB" (None: Dask's share of the machine)

    @model_validator(mode="after")
    def _one_kind_of_cluster(self) -> ParallelismConfig:
        if self.address and self.workers:
            raise ValueError("parallelism: give workers (a local cluster) or address (an existing one), not both")
        return self

    @property
    def parallel(self) -> bool:
        return bool(self.workers or self.address)


class TrainConfig(Section):
    seed: int = 42
    families: list[Family] = ["logistic_regression", "hist_gradient_boosting"]
    search: SearchConfig = SearchConfig()
    # family -> param name -> candidate values (grid: all combinations; random and bayesian: choices)
    search_space: dict[Family, dict[str, list[Any]]] = {}
    imputation: ImputationConfig = ImputationConfig()
    experiment: str = "flywheel"
    parallelism: ParallelismConfig = ParallelismConfig()

    @model_validator(mode="after")
    def _space_only_for_known_families(self) -> TrainConfig:
        extra = set(self.search_space) - set(self.families)
        if extra:
            raise ValueError(f"search_space names families not in families: {sorted(extra)}")
        return self


class EvaluateConfig(Section):
    gates_file: Path = Path("configs/gates.yaml")
    # laid over the gates file, section by section (e.g. a profile relaxing the latency budget)
    gate_overrides: dict[str, dict[str, Any]] = {}


class RegisterConfig(Section):
    model_name: str | None = None  # defaults to the dataset's name


class ServeConfig(Section):
    """The online prediction service (`flywheel serve`)."""

    host: str = "127.0.0.1"
    port: int = Field(8080, ge=1, le=65535)
    model_name: str | None = None  # default: register.model_name, else the dataset's name
    admin_token_env: str = "FLYWHEEL_ADMIN_TOKEN"  # the variable holding the admin token; never in files
    registry_poll_seconds: float = Field(5.0, gt=0)  # also how often an unreachable feature store is re-tried
    # registry unreachable: "refuse" answers 503 until it returns (nobody can tell which version should
    # serve); "serve_loaded" keeps answering with the verified models in memory
    on_registry_outage: Literal["refuse", "serve_loaded"] = "refuse"
    max_batch: int = Field(1000, ge=1, le=100_000)
    prediction_log_url: str = "sqlite:///{home}/data/predictions.db"
    log_flush_seconds: float = Field(0.5, gt=0)
    latency_budget_ms: float = Field(10.0, gt=0)


class BatchConfig(Section):
    """Offline (batch) scoring and the training-serving skew check."""

    output_dir: Path = Path("data/predictions")
    cron: str = "0 2 * * *"
    skew_sample: int = Field(100, ge=1)
    skew_tolerance: float = Field(1e-6, ge=0)
    # entities scored per partition; partitions run one after another, or on Dask when parallelism asks
    partition_rows: int = Field(100_000, ge=1)
    parallelism: ParallelismConfig = ParallelismConfig()


class RetentionConfig(Section):
    """How long the growing stores keep their rows (flows/retention.py, daily on `cron`). Rows the loop still
    needs are kept whatever these say: the prediction log and the monitoring history keep at least the
    monitoring policy's performance lookback (the realized figures join those windows to late outcomes).
    The audit log and the trigger decisions are never touched."""

    cron: Cron = "40 4 * * *"  # daily (deployment `retention`; prefect.yaml repeats it, a test compares)
    prediction_log_days: int = Field(90, ge=1, le=36_500)  # served predictions (and their scoring errors)
    monitoring_history_days: int = Field(365, ge=1, le=36_500)  # judged windows and their realized figures
    # offline store: a month's per-batch part files are merged into one file once the month ended this long
    # ago (null: never); every row is kept, the ledger and duplicate detection are unchanged
    compact_after_days: int | None = Field(7, ge=0, le=36_500)


class RolloutConfig(Section):
    """Staged rollouts of a challenger (flows/rollout.py); the strategies live in `plan_file`."""

    plan_file: Path = Path("configs/rollout.yaml")
    strategy: str | None = None  # the plan a run uses when it names none (None: the plan file's `default`)
    approval_required: bool = False  # a human approves in the Prefect UI before full promotion
    approval_timeout_s: float = Field(3600.0, gt=0)  # no answer by then counts as a rejection
    lock_lease_s: float = Field(900.0, gt=0)  # a crashed rollout's lock is taken over after this
    # absolute ceiling on the challenger's p99 request latency during a rollout (the plan's guards also
    # compare it with the champion's). Per profile: a laptop is not the production machine. The default is
    # the production budget, so a profile that forgets the key is judged strictly, not leniently.
    max_p99_latency_ms: float = Field(10.0, gt=0, le=60_000)


class MonitorConfig(Section):
    """Drift and data-quality monitoring of served windows; methods, alarm rules and data-quality limits
    live in `policy_file` (flywheel/monitoring/config.py). Judged windows go to the project database
    (`stores.audit_db_url`), reports under `paths.reports_dir`/monitoring."""

    policy_file: Path = Path("configs/monitoring.yaml")
    # each judged window is also an MLflow run here (metrics to plot, the Evidently report as an artifact)
    mlflow_experiment: str = "flywheel-monitoring"
    # the windows of a backfill (flows/monitoring.py monitoring_backfill) judged on Dask; recorded in time order
    parallelism: ParallelismConfig = ParallelismConfig()


class StackConfig(Section):
    """The persistent local stack (`flywheel up` / `flywheel down`): Prefect server, served deployments,
    the online service and, on request, the MLflow UI; every process bound to `host`."""

    host: str = "127.0.0.1"
    prefect_port: int = Field(4200, ge=1, le=65535)
    prefect_home: Path = Path("data/prefect")  # PREFECT_HOME of the stack; its SQLite database lives here
    pid_dir: Path = Path("data/run")  # <name>.pid, <name>.log and prefect.url
    mlflow_ui: bool = False  # also start `mlflow ui` (about 30 s to answer on 2 cores)
    mlflow_ui_port: int = Field(5000, ge=1, le=65535)
    start_timeout_seconds: float = Field(120.0, gt=0)
    stop_timeout_seconds: float = Field(30.0, gt=0)
    # without a stack, each `flywheel train` / `demo` / flow run starts Prefect's ephemeral server and waits
    # this long for it (Prefect's own default, 20, expires on a busy 2-core machine); applied as
    # PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS (an int in Prefect) unless that variable is set
    ephemeral_startup_timeout_seconds: int = Field(180, ge=1)


class DeployConfig(Section):
    """`flywheel deploy`: the work pools of deployments/prefect.yaml and how a crashed run is detected. A flow
    run sends a heartbeat every `heartbeat_seconds` (set in the pool's job environment, so every worker's
    runs have it); an automation marks a Running run Crashed when none came for `crashed_after_seconds`."""

    heartbeat_seconds: int = Field(60, ge=30)  # Prefect refuses less than 30
    crashed_after_seconds: int = Field(300, ge=60)

    @field_validator("crashed_after_seconds")
    @classmethod
    def _longer_than_a_heartbeat(cls, value: int, info: ValidationInfo) -> int:
        beat = info.data.get("heartbeat_seconds", 0)
        if value <= beat:
            raise ValueError(f"must exceed deploy.heartbeat_seconds ({beat}), or every run would be marked Crashed")
        return value


class WebhookConfig(Section):
    """The webhook receiver (`flywheel webhook`): verifies HMAC-signed deliveries, records each one, emits a
    Prefect event. The secrets themselves live only in the environment variables named here."""

    host: str = "127.0.0.1"
    port: int = Field(8090, ge=1, le=65535)
    max_body_bytes: int = Field(65536, ge=1024, le=10 * 1024 * 1024)
    tolerance_s: int = Field(300, ge=1, le=3600)  # a signed timestamp further off (past or future) is refused
    secret_env: str = "FLYWHEEL_WEBHOOK_SECRET"
    previous_secret_env: str = "FLYWHEEL_WEBHOOK_SECRET_PREVIOUS"  # the old secret, while senders rotate
    deliveries_db_url: str | None = None  # None: the project database (stores.audit_db_url)
    emit_timeout_s: float = Field(2.0, gt=0, le=30)  # per attempt at POST /api/events
    emit_attempts: int = Field(3, ge=1, le=10)  # transient failures (connection, 5xx) are retried at once
    # the outbox: accepted deliveries' events are sent in the background, in batches of up to outbox_batch;
    # a failed send waits 0.5 s, 1 s, 2 s, ... at most outbox_max_backoff_s; idle, the table is polled every
    # outbox_poll_s (a new delivery wakes the sender, which waits outbox_linger_s for others to join its batch)
    outbox_batch: int = Field(100, ge=1, le=1000)
    outbox_linger_s: float = Field(0.2, ge=0, le=5)
    outbox_poll_s: float = Field(1.0, gt=0, le=60)
    outbox_max_backoff_s: float = Field(30.0, ge=0.1, le=3600)

    @field_validator("secret_env", "previous_secret_env")
    @classmethod
    def _a_variable_that_is_not_a_setting(cls, value: str) -> str:
        return secret_env_name(value)

    @field_validator("previous_secret_env")
    @classmethod
    def _two_different_variables(cls, value: str, info: ValidationInfo) -> str:
        if value == info.data.get("secret_env"):
            raise ValueError("secret_env and previous_secret_env must name different variables")
        return value


class TriggersConfig(Section):
    """When the loop acts on its own: cron schedules, event rules (drift, performance, volume, staleness,
    explicit requests), cooldown, dedupe and liveness, all in `policy_file` (flywheel/triggers.py)."""

    policy_file: Path = Path("configs/triggers.yaml")


class NotifyTarget(Section):
    """One outgoing webhook that receives alarms, signed with the secret held by the variable `secret_env`."""

    url: str
    secret_env: str  # the NAME of the environment variable holding the shared secret; never the secret

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not re.match(r"^https?://[^\s/]+", value):
            raise ValueError(f"{value!r} is not an http(s) URL")
        return value

    @field_validator("secret_env")
    @classmethod
    def _a_variable_that_is_not_a_setting(cls, value: str) -> str:
        return secret_env_name(value)


class NotifyConfig(Section):
    """Where alarms (drift, data quality, performance, liveness) are sent (flywheel/notify.py)."""

    targets: list[NotifyTarget] = []  # none: alarms are recorded and logged, sent nowhere
    timeout_s: float = Field(5.0, gt=0, le=120)  # per attempt
    attempts: int = Field(3, ge=1, le=10)  # connection errors, timeouts, 408/429/5xx are retried
    backoff_s: float = Field(1.0, ge=0, le=60)  # first wait between attempts; doubles each time
    backoff_max_s: float = Field(30.0, ge=0, le=600)


class TelemetryConfig(Section):
    enabled: bool = False


class Settings(BaseSettings):
    """The root of every setting. Loaded once per entry point by `load_settings()`."""

    model_config = SettingsConfigDict(extra="forbid", frozen=True)

    profile: Literal["local", "ci", "production"] = "local"
    dataset: Path = Path("configs/datasets/churn.yaml")
    paths: PathsConfig = PathsConfig()
    stores: StoresConfig = StoresConfig()
    validate_: ValidateConfig = Field(ValidateConfig(), alias="validate")
    features: FeaturesConfig = FeaturesConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    register_: RegisterConfig = Field(RegisterConfig(), alias="register")
    serve: ServeConfig = ServeConfig()
    batch: BatchConfig = BatchConfig()
    stack: StackConfig = StackConfig()
    deploy: DeployConfig = DeployConfig()
    rollout: RolloutConfig = RolloutConfig()
    webhook: WebhookConfig = WebhookConfig()
    monitor: MonitorConfig = MonitorConfig()
    triggers: TriggersConfig = TriggersConfig()
    notify: NotifyConfig = NotifyConfig()
    retention: RetentionConfig = RetentionConfig()
    # the time the project's logic runs on (cooldowns, staleness, liveness); `simulated` runs days in seconds
    clock: ClockConfig = WallClockConfig()
    telemetry: TelemetryConfig = TelemetryConfig()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The layers are merged (with provenance) by load_settings; only the merged dict is read here.
        return (init_settings,)

    def resolve(self, path: Path | str) -> Path:
        """An absolute path: relative ones are taken from `paths.home`."""
        p = Path(path)
        return p if p.is_absolute() else (self.paths.home / p).resolve()

    def store_url(self, template: str) -> str:
        return template.replace("{home}", str(self.paths.home.resolve()))

    @property
    def mlflow_tracking_uri(self) -> str:
        return self.store_url(self.stores.mlflow_tracking_uri)

    @property
    def mlflow_artifact_location(self) -> str:
        return self.store_url(self.stores.mlflow_artifact_location)

    @property
    def audit_db_url(self) -> str:
        return self.store_url(self.stores.audit_db_url)

    @property
    def owner_db_url(self) -> str:
        """The URL `flywheel db upgrade` runs with: the owner role's, else the project database's."""
        return self.store_url(self.stores.owner_db_url or self.stores.audit_db_url)

    @property
    def project_db_urls(self) -> list[str]:
        """Every URL the application opens the project's tables with (audit log, prediction log, deliveries)."""
        urls = [self.audit_db_url, self.store_url(self.serve.prediction_log_url), self.webhook_deliveries_url]
        return list(dict.fromkeys(urls))

    @property
    def mlflow_ui_url(self) -> str:
        """Where people open MLflow (run summaries link here): the tracking server, or the stack's `mlflow ui`."""
        uri = self.mlflow_tracking_uri
        if uri.startswith(("http://", "https://")):
            return uri.rstrip("/")
        return f"http://{self.stack.host}:{self.stack.mlflow_ui_port}"

    @property
    def webhook_deliveries_url(self) -> str:
        """Where the receiver records deliveries: its own URL, else beside the audit log."""
        return self.store_url(self.webhook.deliveries_db_url or self.stores.audit_db_url)


# ---------------------------------------------------------------------------------------- loading


def _read_layer(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError([(str(path), "", "file not found")])
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError([(str(path), "", f"not valid YAML: {exc}")]) from exc
    if not isinstance(data, dict):
        raise ConfigError([(str(path), "", f"top level must be a mapping, got {type(data).__name__}")])
    return data


def _env_layer(environ: dict[str, str]) -> tuple[dict[str, Any], dict[str, str]]:
    """FLYWHEEL_TRAIN__SEED=7 -> {'train': {'seed': 7}}; values parsed as YAML scalars."""
    out: dict[str, Any] = {}
    names: dict[str, str] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX) or name in NOT_SETTINGS:
            continue
        keys = [k.lower() for k in name[len(ENV_PREFIX) :].split("__")]
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = out
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError([(name, ".".join(keys), "conflicts with another FLYWHEEL_ variable")])
        node[keys[-1]] = value
        names[".".join(keys)] = name
    return out, names


def _merge(
    base: dict[str, Any], layer: dict[str, Any], source: str, prov: dict[str, str], prefix: str = ""
) -> None:
    for key, value in layer.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value, source, prov, dotted + ".")
        else:
            base[key] = value
            prov[dotted] = source
            # a whole sub-mapping set here: every key under it comes from this source too
            for k in [p for p in prov if p.startswith(dotted + ".")]:
                prov[k] = source


def _source_of(dotted: str, prov: dict[str, str]) -> str:
    parts = dotted.split(".")
    for n in range(len(parts), 0, -1):
        hit = prov.get(".".join(parts[:n]))
        if hit:
            return hit
    return "defaults"


def load_settings(
    profile: str | None = None,
    config_dir: Path | str | None = None,
    environ: dict[str, str] | None = None,
    overrides: dict[str, Any] | None = None,
) -> Settings:
    """Load, merge and validate base + profile + environment (+ explicit overrides)."""
    environ = dict(os.environ if environ is None else environ)
    profile = profile or environ.get("FLYWHEEL_PROFILE", "local")
    if profile not in PROFILES:
        raise ConfigError([("FLYWHEEL_PROFILE", "profile", f"unknown profile {profile!r}; one of {PROFILES}")])
    cdir = Path(config_dir or environ.get("FLYWHEEL_CONFIG_DIR", "configs")).resolve()

    merged: dict[str, Any] = {}
    prov: dict[str, str] = {}
    base_file, profile_file = cdir / "base.yaml", cdir / f"{profile}.yaml"
    _merge(merged, _read_layer(base_file), str(base_file), prov)
    _merge(merged, _read_layer(profile_file), str(profile_file), prov)
    env_layer, env_names = _env_layer(environ)
    for dotted, var in env_names.items():
        _merge(merged, _nest(dotted, _dig(env_layer, dotted)), var, prov)
    if overrides:
        _merge(merged, overrides, "overrides", prov)
    merged["profile"] = profile
    prov["profile"] = str(profile_file)
    # relative `home` is relative to the project root, i.e. the folder holding configs/
    home = Path(merged.get("paths", {}).get("home", "."))
    merged.setdefault("paths", {})["home"] = str(home if home.is_absolute() else (cdir.parent / home).resolve())

    try:
        settings = Settings.model_validate(merged)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            dotted = ".".join(str(p) for p in _input_loc(merged, err["loc"]))
            problems.append((_source_of(dotted, prov), dotted, err["msg"]))
        raise ConfigError(problems) from None
    _check_paths(settings, prov)
    return settings


def _input_loc(data: Any, loc: tuple[Any, ...]) -> list[Any]:
    """An error's location as the keys the user wrote: a discriminated union adds its tag to the location
    (`clock.simulated.start`), which is no key of any file (`clock.start`)."""
    out: list[Any] = []
    node = data
    for i, part in enumerate(loc):
        last = i == len(loc) - 1
        if isinstance(node, dict) and isinstance(part, str) and part not in node and not last:
            continue  # a union tag
        out.append(part)
        if isinstance(node, dict):
            node = node.get(part)
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            node = node[part]
        else:
            node = None
    return out


def _dig(tree: dict[str, Any], dotted: str) -> Any:
    node: Any = tree
    for k in dotted.split("."):
        node = node[k]
    return node


def _nest(dotted: str, value: Any) -> dict[str, Any]:
    out: dict[str, Any] = value
    for k in reversed(dotted.split(".")):
        out = {k: out}
    return out


def _check_paths(settings: Settings, prov: dict[str, str]) -> None:
    problems = []
    for key, path in (("dataset", settings.dataset), ("evaluate.gates_file", settings.evaluate.gates_file),
                      ("triggers.policy_file", settings.triggers.policy_file)):
        if not settings.resolve(path).is_file():
            problems.append((_source_of(key, prov), key, f"file not found: {settings.resolve(path)}"))
    if problems:
        raise ConfigError(problems)


def load_yaml_model(model: type[M], path: Path) -> M:
    """Load one YAML file into a strict model; errors name the file and the key."""
    data = _read_layer(path)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(
            [(str(path), ".".join(str(p) for p in e["loc"]), e["msg"]) for e in exc.errors()]
        ) from None


def apply_runtime_environment(settings: Settings) -> None:
    """Entry-point start step: telemetry off unless asked for, stores pointed at the settings, Prefect's
    ephemeral-server start-up timeout. Prefect reads its settings once, when it is first imported: call
    this before. A variable already set in the environment wins."""
    if not settings.telemetry.enabled:
        for var, value in {
            "DO_NOT_TRACK": "1",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "GX_ANALYTICS_ENABLED": "false",
            "FEAST_USAGE": "False",
            "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
        }.items():
            os.environ.setdefault(var, value)
    if settings.stores.prefect_api_url:
        os.environ.setdefault("PREFECT_API_URL", settings.stores.prefect_api_url)
    os.environ.setdefault(EPHEMERAL_STARTUP_TIMEOUT_VAR, str(settings.stack.ephemeral_startup_timeout_seconds))
    for d in (settings.paths.data_dir, settings.paths.incoming_dir, settings.paths.quarantine_dir,
              settings.paths.offline_dir, settings.paths.reports_dir):
        settings.resolve(d).mkdir(parents=True, exist_ok=True)

