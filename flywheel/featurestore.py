"""Feast adapter: the repository, versioned feature services, offline ingest, online loads, point-in-time joins.

Layout of the offline store (one folder per dataset under `paths.offline_dir`):
  <dataset>/features.parquet  entity, event time, created (arrival) time, features, batch id
  <dataset>/labels.parquet    entity, event time (the prediction time), label, label time, context, batch id
  <dataset>/ledger.json       batch id -> rows written (a summary; the batch id column is the guard)

Versioning: a feature service is the contract between a model and its features, and Feast services
have no version field. So the service AND its feature view are named `<dataset>_<hash>` /
`<dataset>_fv_<hash>`, where the hash covers what changes the served values (features and types, TTL,
entity, source file and timestamp columns). The view carries the hash too because a service only
holds a projection (view name + feature names): if the view were updated in place, an old service
(and the model trained on it) would silently read the new TTL or types. One view per version costs a
table per version in the online store; both views read the same parquet file.

Feast is imported inside the functions that need it (its import costs seconds); this module is
imported by tasks and flows, not by the CLI.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import pandas as pd
import pyarrow.parquet as pq
import yaml

from flywheel.errors import FeatureJoinError, FlywheelError
from flywheel.schemas import DatasetDefinition, Result

if TYPE_CHECKING:
    from feast import Entity, FeatureService, FeatureStore, FeatureView, FileSource

    from flywheel.settings import FeaturesConfig, StoresConfig

PROJECT = "flywheel"
FEATURES_FILE = "features.parquet"
LABELS_FILE = "labels.parquet"
LEDGER_FILE = "ledger.json"
BATCH_COLUMN = "flywheel_batch_id"
DEFAULT_CREATED_COLUMN = "flywheel_created_at"  # when the dataset has no arrival-time column
TEMPLATE_DIR = "feature_repo"  # the repository template, relative to the project home
TEMPLATE_FILES = ("definitions.py", ".feastignore", "README.md")
TAG_DATASET = "flywheel.dataset"
TAG_VERSION = "flywheel.version"


# ------------------------------------------------------------------------------------- reports


class IngestReport(Result):
    dataset: str
    batch_id: str
    skipped: bool  # True: this batch was already in the offline store; nothing was written
    feature_rows: int
    label_rows: int
    total_feature_rows: int
    total_label_rows: int
    features_path: str
    labels_path: str


class ViewLoad(Result):
    view: str
    # full: the whole history; incremental: the event-time window of rows that arrived since the last
    # load; up-to-date: nothing arrived since
    mode: Literal["full", "incremental", "up-to-date"]
    start: datetime | None  # None when up to date
    end: datetime


class MaterializeReport(Result):
    dataset: str
    end: datetime
    loads: list[ViewLoad]
    seconds: float

    @property
    def modes(self) -> dict[str, str]:
        return {load.view: load.mode for load in self.loads}


class JoinReport(Result):
    service: str
    entity_rows: int  # label rows sent to Feast (after the as-of cut)
    returned_rows: int  # rows the join gave back
    dropped_rows: int  # entity rows the join did not return at all (Feast's file store drops some)
    all_null_rows: int  # returned rows with every feature missing (no feature row in TTL, or none at all)
    dropped_share: float
    all_null_share: float
    duplicate_label_rows: int = 0  # same entity and timestamp sent twice; the later copy is kept
    training_rows: int = 0  # rows handed to training (returned minus all-null)
    as_of: datetime | None = None
    seconds: float = 0.0
    engine: str = "feast"  # features.join_engine: duckdb (flywheel/pitjoin.py) or feast


    def to_markdown(self) -> str:
        rows = [
            ("feature service", self.service),
            ("as of", self.as_of.isoformat() if self.as_of else "now"),
            ("entity (label) rows", self.entity_rows),
            ("join engine", self.engine),
            ("returned by the join", self.returned_rows),
            ("dropped by the join", f"{self.dropped_rows} ({self.dropped_share:.2%})"),
            ("returned with all features null", f"{self.all_null_rows} ({self.all_null_share:.2%})"),
            ("duplicate label rows removed", self.duplicate_label_rows),
            ("training rows", self.training_rows),
            ("join seconds", f"{self.seconds:.2f}"),
        ]
        body = "\n".join(f"| {k} | {v} |" for k, v in rows)
        return f"## Training set: point-in-time join\n\n| | |\n|---|---|\n{body}\n"


# ------------------------------------------------------------------------------------ repository


def render_repo(stores: StoresConfig, home: Path) -> Path:
    """Write a concrete Feast repo (feature_store.yaml with absolute paths) into `home/stores.feast_repo`.

    The template's definitions module is copied beside it when `home/feature_repo/` exists, so the
    `feast` CLI works in the rendered folder too; Flywheel itself only needs the YAML.
    """
    home = Path(home).resolve()
    repo = _under(home, stores.feast_repo)
    repo.mkdir(parents=True, exist_ok=True)
    registry = _under(home, stores.feast_registry)
    registry.parent.mkdir(parents=True, exist_ok=True)
    online: dict[str, Any]
    if stores.feast_online.type == "sqlite":
        online_path = _under(home, stores.feast_online.path)
        online_path.parent.mkdir(parents=True, exist_ok=True)
        online = {"type": "sqlite", "path": str(online_path)}
    else:
        online = {"type": "redis", "connection_string": stores.feast_online.connection_string}
    config = {
        "project": PROJECT,
        "provider": "local",
        "registry": {"registry_type": "file", "path": str(registry)},
        "offline_store": {"type": stores.feast_offline},
        "online_store": online,
        "entity_key_serialization_version": 3,
        "auth": {"type": "no_auth"},
    }
    header = "# Rendered by flywheel.featurestore.render_repo from settings.stores; edit the settings, not this.\n"
    _atomic_write_text(repo / "feature_store.yaml", header + yaml.safe_dump(config, sort_keys=False))
    template = home / TEMPLATE_DIR
    for name in TEMPLATE_FILES:
        if (template / name).is_file():
            shutil.copyfile(template / name, repo / name)
    return repo


def open_store(repo: Path) -> FeatureStore:
    """A FeatureStore on a rendered repo."""
    from feast import FeatureStore

    repo = Path(repo)
    if not (repo / "feature_store.yaml").is_file():
        raise FlywheelError(f"no feature_store.yaml in {repo}: render the repo first (render_repo)")
    return FeatureStore(repo_path=str(repo))


def _under(home: Path, path: Path) -> Path:
    return path if path.is_absolute() else (home / path).resolve()


# ----------------------------------------------------------------------------------- definitions


@dataclass(frozen=True)
class FeatureDefinitions:
    """The Feast objects for one dataset version, in the order a reader needs them."""

    source: FileSource
    entity: Entity
    view: FeatureView
    service: FeatureService
    version: str  # 8-hex content hash

    @property
    def service_name(self) -> str:
        return self.service.name

    @property
    def objects(self) -> list[Any]:
        return [self.source, self.entity, self.view, self.service]


def created_column(dataset: DatasetDefinition) -> str:
    """The offline column holding each feature row's arrival time."""
    return dataset.created_timestamp or DEFAULT_CREATED_COLUMN


def dataset_dir(offline_dir: Path, dataset: DatasetDefinition) -> Path:
    return Path(offline_dir) / dataset.name


def _feast_type(kind: str) -> Any:
    from feast.types import Bool, Float64, Int64, String

    return {"float": Float64, "int": Int64, "category": String, "bool": Bool, "string": String}[kind]


def build_definitions(dataset: DatasetDefinition, ttl_days: int, offline_dir: Path) -> FeatureDefinitions:
    """Source -> entity -> feature view (explicit schema, TTL, owner tags) -> versioned feature service."""
    from feast import Entity, FeatureService, FeatureView, Field, FileSource, ValueType

    features_path = dataset_dir(Path(offline_dir).resolve(), dataset) / FEATURES_FILE
    source = FileSource(
        name=f"{dataset.name}_source",
        path=str(features_path),
        timestamp_field=dataset.timestamp,
        created_timestamp_column=created_column(dataset),
        description=f"{dataset.name} feature rows, appended per validated batch",
        owner=dataset.owner,
    )
    entity = Entity(
        name=dataset.entity,
        join_keys=[dataset.entity],
        value_type=ValueType.INT64 if dataset.entity_type == "int" else ValueType.STRING,
        description=f"{dataset.name} entity",
        owner=dataset.owner,
    )
    entity_field = Field(name=dataset.entity, dtype=_feast_type(dataset.entity_type))
    schema = [entity_field] + [
        Field(name=f.name, dtype=_feast_type(f.type), description=f.description) for f in dataset.features
    ]

    def view_named(version: str) -> FeatureView:
        return FeatureView(
            name=f"{dataset.name}_fv_{version}",
            entities=[entity],
            ttl=timedelta(days=ttl_days),
            schema=schema,
            source=source,
            online=True,
            description=dataset.description,
            owner=dataset.owner,
            tags={TAG_DATASET: dataset.name, TAG_VERSION: version, "owner": dataset.owner},
        )

    version = _fingerprint(view_named("x"))
    view = view_named(version)
    service = FeatureService(
        name=f"{dataset.name}_{version}",
        features=[view],
        description=f"features of {dataset.name}, version {version}",
        owner=dataset.owner,
        tags={TAG_DATASET: dataset.name, TAG_VERSION: version, "owner": dataset.owner},
    )
    return FeatureDefinitions(source=source, entity=entity, view=view, service=service, version=version)


def _view_payload(view: FeatureView, features: Sequence[str] | None = None) -> dict[str, Any]:
    """What changes the served values. The source is named by its last two path parts, not the absolute
    folder, so a service keeps its name across homes (laptop, CI, production)."""
    src = view.batch_source
    wanted = set(features) if features is not None else None
    return {
        "features": [[f.name, str(f.dtype)] for f in view.features if wanted is None or f.name in wanted],
        "entity": [[f.name, str(f.dtype)] for f in view.entity_columns],
        "ttl_seconds": int(view.ttl.total_seconds()) if view.ttl else 0,
        "source": {
            "file": "/".join(Path(getattr(src, "path", "") or "").parts[-2:]),
            "timestamp": src.timestamp_field if src else None,
            "created": src.created_timestamp_column if src else None,
        },
    }


def _fingerprint(view: FeatureView) -> str:
    blob = json.dumps(_view_payload(view), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:8]


def _registered_payloads(store: FeatureStore, service: FeatureService) -> list[dict[str, Any]]:
    out = []
    for proj in service.feature_view_projections:
        view = store.get_feature_view(proj.name)
        out.append(_view_payload(view, [f.name for f in proj.features]))
    return out


def apply_feature_definitions(store: FeatureStore, defs: FeatureDefinitions) -> str:
    """Apply one version; a no-op when it is already registered. Returns the service name.

    Refuses (FlywheelError) to change a registered service: a model trained on a service must keep
    reading exactly the features it was trained on.
    """
    from feast.errors import FeatureServiceNotFoundException

    try:
        existing = store.get_feature_service(defs.service.name, allow_cache=False)
    except FeatureServiceNotFoundException:
        existing = None
    if existing is not None:
        new = [_view_payload(defs.view, [f.name for f in defs.view.features])]
        old = _registered_payloads(store, existing)
        if old != new:
            raise FlywheelError(
                f"feature service {defs.service.name!r} is already registered with a different definition; "
                f"services are immutable, so a changed definition needs a new name.\n"
                f"registered: {json.dumps(old, sort_keys=True)}\nnew: {json.dumps(new, sort_keys=True)}"
            )
        return defs.service.name
    store.apply(defs.objects)
    return defs.service.name


def apply_definitions(store: FeatureStore, dataset: DatasetDefinition, ttl_days: int, offline_dir: Path) -> str:
    """Build the dataset's current definitions and apply them (no-op when unchanged). Returns the service."""
    return apply_feature_definitions(store, build_definitions(dataset, ttl_days, offline_dir))


def dataset_views(store: FeatureStore, dataset: DatasetDefinition) -> list[FeatureView]:
    """Every registered view version of the dataset."""
    return sorted(
        store.list_feature_views(allow_cache=False, tags={TAG_DATASET: dataset.name}), key=lambda v: v.name
    )


# ---------------------------------------------------------------------------------------- ingest


def _utc(series: pd.Series, column: str) -> pd.Series:
    if pd.api.types.is_datetime64_any_dtype(series) and getattr(series.dt, "tz", None) is None:
        raise FlywheelError(f"column {column!r} holds naive timestamps; Flywheel needs tz-aware UTC times")
    try:
        out = pd.to_datetime(series, utc=True)
    except (ValueError, TypeError) as exc:
        raise FlywheelError(f"column {column!r} is not a timestamp column: {exc}") from exc
    # Microseconds, not pandas' nanoseconds: DuckDB reads a nanosecond UTC parquet column as
    # TIMESTAMPTZ_NS, which Feast's materialize query cannot cast to TIMESTAMP (ConversionException).
    return out.astype("datetime64[us, UTC]")


def _typed_feature(series: pd.Series, kind: str, column: str) -> pd.Series:
    try:
        if kind == "float":
            return pd.to_numeric(series).astype("float64")
        if kind == "int":
            return pd.to_numeric(series).astype("Int64")  # nullable, and refuses non-integral values
        if kind == "bool":
            return series.astype("boolean")
        return series.astype("string").astype(object).where(series.notna(), None)
    except (ValueError, TypeError) as exc:
        raise FlywheelError(f"feature {column!r} cannot be stored as {kind}: {exc}") from exc


def _feature_rows(df: pd.DataFrame, dataset: DatasetDefinition, batch_id: str) -> pd.DataFrame:
    event = _utc(df[dataset.timestamp], dataset.timestamp)
    created = _utc(df[dataset.created_timestamp], dataset.created_timestamp) if dataset.created_timestamp else event
    out = pd.DataFrame(
        {
            dataset.entity: _entity(df[dataset.entity], dataset),
            dataset.timestamp: event,
            created_column(dataset): created,
        }
    )
    for f in dataset.features:
        out[f.name] = _typed_feature(df[f.name], f.type, f.name)
    out[BATCH_COLUMN] = batch_id
    return out.reset_index(drop=True)


def _label_rows(df: pd.DataFrame, dataset: DatasetDefinition, batch_id: str) -> pd.DataFrame:
    out = pd.DataFrame(
        {
            dataset.entity: _entity(df[dataset.entity], dataset),
            dataset.timestamp: _utc(df[dataset.timestamp], dataset.timestamp),
            dataset.label: df[dataset.label].to_numpy(),
        }
    )
    created = dataset.created_timestamp
    out[created_column(dataset)] = (_utc(df[created], created) if created else out[dataset.timestamp]).to_numpy()
    if dataset.label_timestamp:
        out[dataset.label_timestamp] = _utc(df[dataset.label_timestamp], dataset.label_timestamp).to_numpy()
    for c in dataset.context_columns:
        out[c] = df[c].to_numpy()
    out[BATCH_COLUMN] = batch_id
    return out.reset_index(drop=True)


def _entity(series: pd.Series, dataset: DatasetDefinition) -> pd.Series:
    if series.isna().any():
        raise FlywheelError(f"entity column {dataset.entity!r} has {int(series.isna().sum())} missing values")
    return series.astype("int64") if dataset.entity_type == "int" else series.astype(str)


def _missing_columns(df: pd.DataFrame, dataset: DatasetDefinition) -> list[str]:
    return [c for c in dataset.required_columns if c not in df.columns]


@contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """One writer per dataset folder at a time (read-modify-write of the parquet files)."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _has_batch(path: Path, batch_id: str) -> bool:
    if not path.exists():
        return False
    ids = pq.read_table(path, columns=[BATCH_COLUMN]).column(BATCH_COLUMN)
    return batch_id in set(ids.to_pylist())


def _append_parquet(path: Path, rows: pd.DataFrame) -> int:
    """Append by rewriting to a temp file and renaming it over the old one (readers never see half a file)."""
    frame = pd.concat([pd.read_parquet(path), rows], ignore_index=True) if path.exists() else rows
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    frame.to_parquet(tmp, index=False)
    os.replace(tmp, path)
    return len(frame)


def _parquet_rows(path: Path) -> int:
    return pq.ParquetFile(path).metadata.num_rows if path.exists() else 0


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def ingest_batch(df: pd.DataFrame, dataset: DatasetDefinition, offline_dir: Path, batch_id: str) -> IngestReport:
    """Append a validated batch to the dataset's offline files; re-ingesting a batch id adds nothing."""
    if not batch_id:
        raise FlywheelError("ingest_batch needs a non-empty batch_id")
    missing = _missing_columns(df, dataset)
    if missing:
        raise FlywheelError(f"batch {batch_id} lacks columns of dataset {dataset.name!r}: {missing}")
    folder = dataset_dir(offline_dir, dataset)
    fpath, lpath = folder / FEATURES_FILE, folder / LABELS_FILE
    features, labels = _feature_rows(df, dataset, batch_id), _label_rows(df, dataset, batch_id)
    with _locked(folder):
        # Each file is checked on its own, so a crash between the two writes heals on the retry.
        wrote_f = not _has_batch(fpath, batch_id)
        wrote_l = not _has_batch(lpath, batch_id)
        if wrote_f:
            _append_parquet(fpath, features)
        if wrote_l:
            _append_parquet(lpath, labels)
        ledger_path = folder / LEDGER_FILE
        ledger = json.loads(ledger_path.read_text()) if ledger_path.exists() else {}
        skipped = not (wrote_f or wrote_l)
        if not skipped:
            ledger[batch_id] = {
                "feature_rows": len(features),
                "label_rows": len(labels),
                "ingested_at": datetime.now(UTC).isoformat(),
            }
            _atomic_write_text(ledger_path, json.dumps(ledger, indent=1, sort_keys=True))
        return IngestReport(
            dataset=dataset.name,
            batch_id=batch_id,
            skipped=skipped,
            feature_rows=len(features) if wrote_f else 0,
            label_rows=len(labels) if wrote_l else 0,
            total_feature_rows=_parquet_rows(fpath),
            total_label_rows=_parquet_rows(lpath),
            features_path=str(fpath),
            labels_path=str(lpath),
        )


def _mark_materialized(folder: Path, batch_ids: set[str]) -> None:
    """Record in the ledger that these batches are in the online store."""
    if not batch_ids:
        return
    with _locked(folder):
        path = folder / LEDGER_FILE
        ledger = json.loads(path.read_text()) if path.exists() else {}
        now = datetime.now(UTC).isoformat()
        for b in batch_ids & set(ledger):
            ledger[b]["materialized_at"] = now
        _atomic_write_text(path, json.dumps(ledger, indent=1, sort_keys=True))


def ingested_batches(dataset: DatasetDefinition, offline_dir: Path) -> dict[str, dict[str, Any]]:
    path = dataset_dir(offline_dir, dataset) / LEDGER_FILE
    return json.loads(path.read_text()) if path.exists() else {}


# ----------------------------------------------------------------------------------- materialize


def materialize_online(
    store: FeatureStore, dataset: DatasetDefinition, offline_dir: Path, end: datetime
) -> MaterializeReport:
    """Load the online store up to `end`, for every registered view version of the dataset.

    A view never loaded before gets `materialize(start, end)` from the data's first event time, because
    `materialize_incremental`'s first run only looks back one TTL. Later loads cover the event-time window
    of the batches the ledger does not mark as loaded yet; whether a view was ever loaded is read from the
    registry's materialization intervals.
    """
    if end.tzinfo is None:
        raise FlywheelError("materialize_online needs a tz-aware end time")
    t0 = time.perf_counter()
    views = dataset_views(store, dataset)
    if not views:
        raise FlywheelError(f"no feature views registered for dataset {dataset.name!r}: apply the repo first")
    fpath = dataset_dir(offline_dir, dataset) / FEATURES_FILE
    if not fpath.exists():
        raise FlywheelError(f"no offline feature rows for {dataset.name!r} at {fpath}: ingest a batch first")
    created = created_column(dataset)
    rows = pq.read_table(fpath, columns=list(dict.fromkeys([dataset.timestamp, created, BATCH_COLUMN]))).to_pandas()
    event, arrived = _utc(rows[dataset.timestamp], dataset.timestamp), _utc(rows[created], created)
    start = event.min().to_pydatetime()
    # Load up to the newest arrival, not past it: offline reads filter by arrival time, so online and
    # offline then agree at `end` (the skew check compares them there).
    end = min(end, (arrived.max() + pd.Timedelta(seconds=1)).to_pydatetime())
    # Batches not loaded online yet, from the ingest ledger. (materialize_incremental would start at the
    # previous end: batches of past events, replayed or late, would never reach the online store.)
    folder = dataset_dir(offline_dir, dataset)
    pending = {b for b, info in ingested_batches(dataset, offline_dir).items() if "materialized_at" not in info}
    in_pending = rows[BATCH_COLUMN].isin(pending) & (arrived < pd.Timestamp(end))
    fresh = [v for v in views if not v.materialization_intervals]
    known = [v for v in views if v.materialization_intervals]
    loads: list[ViewLoad] = []
    if fresh:
        store.materialize(start_date=start, end_date=end, feature_views=[v.name for v in fresh])
        loads += [ViewLoad(view=v.name, mode="full", start=start, end=end) for v in fresh]
    if known:
        if in_pending.any():  # the event-time window of the rows that arrived since the last load
            since = event[in_pending].min().to_pydatetime()
            store.materialize(start_date=since, end_date=end, feature_views=[v.name for v in known])
            loads += [ViewLoad(view=v.name, mode="incremental", start=since, end=end) for v in known]
        else:
            loads += [ViewLoad(view=v.name, mode="up-to-date", start=None, end=end) for v in known]
    loaded = set(rows.loc[in_pending, BATCH_COLUMN]) - set(rows.loc[~in_pending & rows[BATCH_COLUMN].isin(pending),
                                                                     BATCH_COLUMN])
    _mark_materialized(folder, loaded)
    return MaterializeReport(dataset=dataset.name, end=end, loads=loads, seconds=time.perf_counter() - t0)


# -------------------------------------------------------------------------------- training set

_ENTITY_TS = "event_timestamp"  # Feast's default entity-frame timestamp name (it guesses otherwise, noisily)
_ROW = "flywheel_row"  # carries each label row through the join, so nothing else needs to pass through Feast


def service_features(service: FeatureService) -> list[str]:
    return [f.name for proj in service.feature_view_projections for f in proj.features]


def offline_path(folder: Path, name: str) -> Path:
    """Where one offline table lives: `<folder>/<name>` (one file), or else the folder `<folder>/<stem>/` (one
    parquet file per batch). Both read with `pd.read_parquet` and, through `pitjoin.parquet_paths`, DuckDB."""
    single = Path(folder) / name
    per_batch = single.with_suffix("")
    return per_batch if not single.exists() and per_batch.is_dir() else single


def point_in_time_join(
    store: FeatureStore, service: FeatureService, entity_df: pd.DataFrame, cfg: FeaturesConfig
) -> pd.DataFrame:
    """`entity_df` (key, `event_timestamp`, anything else) with the service's point-in-time features, by the
    configured engine; features count only once arrived (created) by the entity row's time, in both."""
    if cfg.join_engine == "feast":
        return store.get_historical_features(
            entity_df=entity_df, features=service, filter_by_created_timestamp=True
        ).to_df()
    import tempfile

    from flywheel import pitjoin

    with tempfile.TemporaryDirectory(prefix="flywheel-pit-") as spill:
        con = pitjoin.connect(memory_limit=cfg.join_memory_limit, temp_dir=Path(spill))
        try:
            return pitjoin.point_in_time_join(entity_df, _ENTITY_TS, pitjoin.view_specs(store, service), con=con)
        finally:
            con.close()


def build_training_set(
    store: FeatureStore,
    dataset: DatasetDefinition,
    service_name: str,
    cfg: FeaturesConfig,
    offline_dir: Path,
    as_of: datetime | None = None,
) -> tuple[pd.DataFrame, JoinReport]:
    """The labelled frame for training: point-in-time features for every label known at `as_of`.

    The prediction time of a label row is its event time (cfg.prediction_time "event") or its arrival
    time ("arrival"). A feature row counts only if its event time AND its arrival (created) time are at
    or before the prediction time, so neither future values nor late-arriving backfills leak in. Rows the
    join (features.join_engine: DuckDB by default, or Feast) drops, or returns with every feature null, are
    counted; past the configured shares the join fails (FeatureJoinError), below them the all-null rows are removed.
    """
    t0 = time.perf_counter()
    cut = as_of or datetime.now(UTC)
    if cut.tzinfo is None:
        raise FlywheelError("as_of must be tz-aware (UTC)")
    lpath = offline_path(dataset_dir(offline_dir, dataset), LABELS_FILE)
    if not lpath.exists():
        raise FlywheelError(f"no label rows for {dataset.name!r} at {lpath}: ingest a batch first")
    labels = pd.read_parquet(lpath)
    known = labels[dataset.timestamp] <= cut
    if dataset.label_timestamp:
        known &= labels[dataset.label_timestamp] <= cut
    labels = labels.loc[known]
    before = len(labels)
    # the same (entity, time) twice would get the same features twice; keep the latest ingested copy
    labels = labels.drop_duplicates([dataset.entity, dataset.timestamp], keep="last").reset_index(drop=True)
    duplicates = before - len(labels)
    if labels.empty:
        raise FlywheelError(f"no labelled rows of {dataset.name!r} are known at {cut.isoformat()}")
    labels[_ROW] = range(len(labels))
    join_time = dataset.timestamp if cfg.prediction_time == "event" else created_column(dataset)

    service = store.get_feature_service(service_name, allow_cache=False)
    features = service_features(service)
    entity_df = pd.DataFrame(
        {_ROW: labels[_ROW], dataset.entity: labels[dataset.entity], _ENTITY_TS: labels[join_time]}
    )
    joined = point_in_time_join(store, service, entity_df, cfg)

    entity_rows, returned = len(entity_df), len(joined)
    dropped = entity_rows - joined[_ROW].nunique()
    all_null_mask = joined[features].isna().all(axis=1)
    all_null = int(all_null_mask.sum())
    report = JoinReport(
        service=service_name,
        entity_rows=entity_rows,
        returned_rows=returned,
        dropped_rows=dropped,
        all_null_rows=all_null,
        dropped_share=dropped / entity_rows,
        all_null_share=all_null / entity_rows,
        duplicate_label_rows=duplicates,
        training_rows=returned - all_null,
        as_of=as_of,
        seconds=time.perf_counter() - t0,
        engine=cfg.join_engine,
    )
    problems = []
    if report.dropped_share > cfg.max_dropped_share:
        problems.append(
            f"{dropped} of {entity_rows} entity rows dropped ({report.dropped_share:.2%} > "
            f"max_dropped_share {cfg.max_dropped_share:.2%})"
        )
    if report.all_null_share > cfg.max_all_null_share:
        problems.append(
            f"{all_null} of {entity_rows} entity rows came back with every feature null "
            f"({report.all_null_share:.2%} > max_all_null_share {cfg.max_all_null_share:.2%})"
        )
    if problems:
        hint = (
            " Causes: feature rows older than the TTL, entities without feature rows before their prediction"
            " time, or (prediction_time: event) snapshots whose features arrive after their own event time."
        )
        err = FeatureJoinError(
            f"point-in-time join of {dataset.name!r} through {service_name!r} lost too much: "
            + "; ".join(problems) + "." + hint
        )
        err.report = report
        raise err
    context = [dataset.entity, dataset.timestamp, dataset.label, *dataset.context_columns]
    out = joined.loc[~all_null_mask, [_ROW, *features]].merge(labels[[_ROW, *context]], on=_ROW, how="inner")
    out = out[[dataset.entity, dataset.timestamp, dataset.label, *features, *dataset.context_columns]]
    out = out.sort_values([dataset.timestamp, dataset.entity], kind="stable").reset_index(drop=True)
    return out, report


# ------------------------------------------------------------------------------------- serving


def get_online_features(store: FeatureStore, service_name: str, entity_ids: Sequence[Any]) -> pd.DataFrame:
    """Online feature values of a service for some entities (unknown entities read as nulls)."""
    service = store.get_feature_service(service_name, allow_cache=True)
    view = store.get_feature_view(service.feature_view_projections[0].name, allow_registry_cache=True)
    key = view.entity_columns[0].name
    rows = [{key: e} for e in entity_ids]
    return store.get_online_features(features=service, entity_rows=rows).to_df()


_SCALAR_VALUES = frozenset({"double_val", "float_val", "int64_val", "int32_val", "string_val", "bool_val"})


class OnlineReader:
    """One feature service's online values, read through the online store's own `online_read`.

    Why not `FeatureStore.get_online_features`: for 100 entities it spends ~45% of its time building
    and converting its protobuf response (measured: 5.3 ms a read, 2.9 ms of it `online_read`). This
    reads each of the service's views with the provider's `online_read` (the online store plug-in API:
    SQLite, Redis, PostgreSQL alike) and converts values with Feast's own `feast_value_type_to_python_type`.
    Same semantics as `get_online_features` on a plain service (tested side by side): an entity with no
    row reads None for each feature, an empty value is None, no TTL filtering online.
    """

    def __init__(self, store: FeatureStore, service: FeatureService) -> None:
        self._config = store.config
        self._provider = store._get_provider()  # the provider of the store's online store (no public accessor)
        self.views: list[tuple[Any, list[str]]] = []
        keys = set()
        for proj in service.feature_view_projections:
            if proj.name_alias:
                raise FlywheelError(f"feature service {service.name!r}: aliased view {proj.name!r} is not supported")
            view = store.get_feature_view(proj.name)
            self.views.append((view, [f.name for f in proj.features]))
            keys.add(tuple((c.name, c.dtype.to_value_type()) for c in view.entity_columns))
        if len(keys) != 1 or len(next(iter(keys))) != 1:
            raise FlywheelError(f"feature service {service.name!r}: its views must share one single-column entity key")
        (self.key, self._value_type), = next(iter(keys))
        self.features = [n for _, names in self.views for n in names]

    def read(self, ids: Sequence[Any]) -> list[dict[str, Any]]:
        """Each entity's feature values (None where missing), in the order of `ids` (duplicates allowed)."""
        return self.read_timed(ids)[0]

    def read_timed(self, ids: Sequence[Any]) -> tuple[list[dict[str, Any]], list[datetime | None]]:
        """`read`, plus each entity's snapshot time: the event time the online store holds for its row
        (the newest over the service's views; None for an entity without a row). `online_read` returns it
        anyway, so it costs a dict entry per entity."""
        from feast.protos.feast.types.EntityKey_pb2 import EntityKey
        from feast.type_map import feast_value_type_to_python_type, python_values_to_proto_values

        unique = list(dict.fromkeys(ids))
        keys = [
            EntityKey(join_keys=[self.key], entity_values=[v])
            for v in python_values_to_proto_values(unique, self._value_type)
        ]
        found: dict[Any, dict[str, Any]] = {e: {} for e in unique}
        times: dict[Any, datetime] = {}
        for view, names in self.views:
            rows = self._provider.online_read(config=self._config, table=view, entity_keys=keys,
                                              requested_features=names)
            for entity, (ts, data) in zip(unique, rows, strict=True):
                if data:
                    if ts is not None:
                        ts = ts if ts.tzinfo is not None else ts.replace(tzinfo=UTC)  # Redis: naive UTC
                        if entity not in times or ts > times[entity]:
                            times[entity] = ts
                    got = found[entity]
                    for name in names:
                        value = data.get(name)
                        kind = None if value is None else value.WhichOneof("val")
                        # scalars directly (a fifth of the cost); anything else through Feast's converter
                        got[name] = (None if kind is None else getattr(value, kind) if kind in _SCALAR_VALUES
                                     else feast_value_type_to_python_type(value))
        return [{n: found[e].get(n) for n in self.features} for e in ids], [times.get(e) for e in ids]
