"""Batch (offline) scoring and the training-serving skew check.

Batch scoring reads point-in-time features from the Feast OFFLINE store through the model's own
feature service (the version tag `flywheel.feature_service`), at one time `at` for every entity, and
applies the registry-verified model. The offline read is Feast's point-in-time rules executed as a DuckDB
ASOF join (flywheel/pitjoin.py, the training set's default engine) over the views' parquet, filtered in the
scan to the scored entities' keys: a partition of entities reads its own rows, not the whole store (issue 11:
five partitions on Dask used to be five full scans through get_historical_features, each worker importing
Feast). The views' definitions come from Feast's registry once, on the caller (`offline_reader`).
The skew check reads a sample of entities from the ONLINE store
and from the OFFLINE store at the time the online store was loaded up to, and compares the vectors
feature by feature and the model's predictions on both: if the two paths disagree, online serving and
batch scoring (and training) see different inputs.

Both paths hand the model the same input contract (`model_input`): numeric features as float64 (NaN
for missing), categorical ones as objects (None for missing). Feast returns nullable Int64 columns
from the online store and the join int64 or float; coercing once keeps dtype noise out of the check.

Feast is only used through objects the caller passes in (and `flywheel.featurestore`); nothing here
imports Prefect.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from flywheel.errors import FlywheelError, SkewError
from flywheel.featurestore import FEATURES_FILE, LABELS_FILE, dataset_dir
from flywheel.pitjoin import ViewSpec
from flywheel.predictor import served_predictor
from flywheel.schemas import DatasetDefinition, Result

if TYPE_CHECKING:
    from feast import FeatureStore

    from flywheel.registry import LoadedModel

TAG_FEATURE_SERVICE = "flywheel.feature_service"
DECISION_THRESHOLD = 0.5  # `prediction` is 1 (the dataset's positive label) at or above this probability
REASON_NO_FEATURES = "no_features"
PREDICTION_FEATURE = "<prediction>"  # the feature name a prediction mismatch is reported under
_ENTITY_TS = "event_timestamp"  # Feast's entity-frame timestamp column

# output columns after the entity id, in order
OUTPUT_COLUMNS = (
    "scored_at",  # when this run scored (the project clock, UTC)
    "feature_time",  # the point in time whose features were used (`at`)
    "model_name",
    "model_version",
    "feature_service",
    "probability",  # of the positive class; null when the entity had no features
    "prediction",  # 1 = positive label, 0 = not; null when the entity had no features
    "imputed_features",  # comma-separated features that were missing and imputed by the model
    "reason",  # why the score is null (REASON_NO_FEATURES), else null
)


# ------------------------------------------------------------------------------------- inputs


def require_utc(at: datetime, what: str = "at") -> datetime:
    if at.tzinfo is None:
        raise FlywheelError(f"{what} must be tz-aware (e.g. 2026-03-01T00:00:00Z), got naive {at.isoformat()}")
    return at.astimezone(UTC)


def model_feature_service(model: LoadedModel) -> str:
    """The Feast service the model was trained with; features must be read through it."""
    service = model.tags.get(TAG_FEATURE_SERVICE)
    if not service:
        raise FlywheelError(
            f"model {model.name} v{model.version} has no {TAG_FEATURE_SERVICE!r} tag: cannot tell which "
            "feature service it was trained with"
        )
    return service


def _entity_ids(series: pd.Series, dataset: DatasetDefinition, where: str) -> pd.Series:
    if series.isna().any():
        raise FlywheelError(f"{where}: entity column {dataset.entity!r} has {int(series.isna().sum())} missing values")
    if dataset.entity_type == "int":
        try:
            numeric = pd.to_numeric(series)
        except (ValueError, TypeError) as exc:
            raise FlywheelError(f"{where}: entity column {dataset.entity!r} is not integer: {exc}") from exc
        if not (numeric == numeric.round()).all():
            raise FlywheelError(f"{where}: entity column {dataset.entity!r} holds non-integer values")
        out = numeric.astype("int64")
    else:
        out = series.astype(str)
    return out.drop_duplicates().reset_index(drop=True).rename(dataset.entity)


def read_entities(path: Path | str, dataset: DatasetDefinition) -> pd.Series:
    """Distinct entity ids from a parquet or CSV file holding the dataset's entity column."""
    path = Path(path)
    if not path.is_file():
        raise FlywheelError(f"entities file {path} does not exist")
    suffix = path.suffix.lower()
    try:
        if suffix in (".parquet", ".pq"):
            frame = pd.read_parquet(path)
        elif suffix == ".csv":
            frame = pd.read_csv(path)
        else:
            raise FlywheelError(f"entities file {path}: expected .parquet or .csv, got {suffix or 'no extension'!r}")
    except FlywheelError:
        raise
    except Exception as exc:  # pandas/pyarrow raise many types for an unreadable file
        if suffix == ".csv" and isinstance(exc, pd.errors.EmptyDataError):
            raise FlywheelError(f"entities file {path} is empty (no header, no rows)") from exc
        raise FlywheelError(f"entities file {path} cannot be read: {exc}") from exc
    if dataset.entity not in frame.columns:
        raise FlywheelError(
            f"entities file {path} has no column {dataset.entity!r} (the entity of dataset {dataset.name!r}); "
            f"its columns: {list(frame.columns)}"
        )
    if frame.empty:
        raise FlywheelError(f"entities file {path} has no rows: nothing to score")
    return _entity_ids(frame[dataset.entity], dataset, f"entities file {path}")


def offline_entities(dataset: DatasetDefinition, offline_dir: Path, at: datetime) -> pd.Series:
    """Every entity with a feature or label row whose event time is at or before `at`."""
    at = require_utc(at)
    folder = dataset_dir(offline_dir, dataset)
    ids: list[pd.Series] = []
    for name in (FEATURES_FILE, LABELS_FILE):
        path = folder / name
        if not path.exists():
            continue
        rows = pq.read_table(path, columns=[dataset.entity, dataset.timestamp]).to_pandas()
        ids.append(rows.loc[rows[dataset.timestamp] <= pd.Timestamp(at), dataset.entity])
    if not ids:
        raise FlywheelError(f"no offline rows for dataset {dataset.name!r} under {folder}: ingest a batch first")
    found = pd.concat(ids, ignore_index=True)
    if found.empty:
        raise FlywheelError(f"dataset {dataset.name!r} has no entity with rows at or before {at.isoformat()}")
    return _entity_ids(found, dataset, f"offline store {folder}").sort_values(ignore_index=True)


# ----------------------------------------------------------------------------------- features


def model_input(frame: pd.DataFrame, dataset: DatasetDefinition) -> pd.DataFrame:
    """The feature columns as the model takes them: numeric float64 (NaN missing), categorical objects
    (None missing). Raises when a column is absent or a numeric one holds non-numbers."""
    missing = [c for c in dataset.feature_names if c not in frame.columns]
    if missing:
        raise FlywheelError(f"feature frame lacks column(s) {missing}")
    out = pd.DataFrame(index=frame.index)
    for f in dataset.features:
        col = frame[f.name]
        if f.is_numeric:
            try:
                out[f.name] = pd.to_numeric(col.astype(object).where(col.notna(), np.nan)).astype("float64")
            except (ValueError, TypeError) as exc:
                raise FlywheelError(f"feature {f.name!r} is not numeric: {exc}") from exc
        else:
            out[f.name] = col.astype(object).where(col.notna(), None)
    return out


@dataclass(frozen=True)
class OfflineReader:
    """How batch scoring reads point-in-time features: the service's views as the DuckDB join reads them
    (flywheel/pitjoin.py, Feast's rules), resolved once from Feast's registry by whoever holds the store. A
    partition on a Dask worker gets this small value, not the store: it needs neither Feast (seconds to import)
    nor the registry, and reads only its own entities' rows (`pitjoin.entity_rows_join`)."""

    service: str
    views: tuple[ViewSpec, ...]
    memory_limit: str | None = None  # DuckDB's cap (it spills to a temp folder past it)
    threads: int | None = None  # DuckDB's threads; None: one per core (a Dask worker of one thread asks for 1)

    def read(self, dataset: DatasetDefinition, ids: Sequence[Any] | pd.Series, at: datetime
             ) -> tuple[pd.DataFrame, int]:
        """Each entity's features at `at` in `model_input` form, one row per id in the order given (index:
        entity id; an entity with no qualifying row reads as all-null), and how many feature rows were read."""
        import tempfile

        from flywheel import pitjoin

        at = require_utc(at)
        ids = pd.Series(list(ids), name=dataset.entity)
        if ids.empty:
            raise FlywheelError("no entities to read features for")
        entity_df = pd.DataFrame({dataset.entity: ids, _ENTITY_TS: pd.Timestamp(at)})
        with tempfile.TemporaryDirectory(prefix="flywheel-score-") as spill:
            con = pitjoin.connect(memory_limit=self.memory_limit, threads=self.threads, temp_dir=Path(spill))
            try:
                joined, read = pitjoin.entity_rows_join(entity_df, _ENTITY_TS, self.views, con=con)
            finally:
                con.close()
        joined.index = pd.Index(ids, name=dataset.entity)  # the join keeps the entity frame's rows in order
        return model_input(joined, dataset), sum(read.values())

    def with_threads(self, threads: int | None) -> OfflineReader:
        return replace(self, threads=threads)


def offline_reader(store: FeatureStore, service_name: str, memory_limit: str | None = None) -> OfflineReader:
    """The reader of a feature service's offline features, from the store's registry (a fresh read)."""
    from flywheel import pitjoin

    service = store.get_feature_service(service_name, allow_cache=False)
    return OfflineReader(service_name, tuple(pitjoin.view_specs(store, service)), memory_limit)


def offline_features(
    store: FeatureStore, service_name: str, dataset: DatasetDefinition, ids: Sequence[Any] | pd.Series, at: datetime
) -> pd.DataFrame:
    """Point-in-time features of each entity at `at` from the offline store, one row per id, in the
    order given (index: entity id). An entity with no qualifying feature row reads as all-null."""
    return offline_reader(store, service_name).read(dataset, ids, at)[0]


def online_features(
    store: FeatureStore, service_name: str, dataset: DatasetDefinition, ids: Sequence[Any] | pd.Series
) -> pd.DataFrame:
    """Online feature values of each entity (index: entity id); unknown entities read as all-null."""
    from flywheel.featurestore import get_online_features

    ids = list(ids)
    frame = get_online_features(store, service_name, ids)
    frame.index = pd.Index(ids, name=dataset.entity)
    return model_input(frame, dataset)


# ------------------------------------------------------------------------------------ scoring


def positive_scores(model: LoadedModel, features: pd.DataFrame, dataset: DatasetDefinition) -> np.ndarray:
    """Probability of the positive class through the model's served predictor (the path the online
    service and the gates use, so batch and online scores agree)."""
    return served_predictor(model, dataset).predict_frame(features)


def score_features(
    model: LoadedModel,
    features: pd.DataFrame,
    dataset: DatasetDefinition,
    at: datetime,
    feature_service: str,
    scored_at: datetime,
) -> pd.DataFrame:
    """One output row per entity of `features` (index: entity id). Entities with every feature missing
    get a null score and `reason` = no_features; the others get the model's probability and 0/1 label."""
    at = require_utc(at)
    scored_at = require_utc(scored_at, "scored_at")
    names = dataset.feature_names
    missing = features[names].isna()
    empty = missing.all(axis=1).to_numpy()
    proba = np.full(len(features), np.nan)
    if (~empty).any():
        proba[~empty] = positive_scores(model, features.loc[~empty, names], dataset)
    prediction = pd.array(np.where(proba >= DECISION_THRESHOLD, 1, 0), dtype="Int64")
    prediction[empty] = pd.NA
    imputed = [",".join(n for n, m in zip(names, row, strict=True) if m) or None for row in missing.to_numpy()]
    out = pd.DataFrame(
        {
            dataset.entity: features.index.to_numpy(),
            "scored_at": pd.Timestamp(scored_at),
            "feature_time": pd.Timestamp(at),
            "model_name": model.name,
            "model_version": str(model.version),
            "feature_service": feature_service,
            "probability": proba,
            "prediction": prediction,
            "imputed_features": pd.Series(imputed, dtype=object).where(~empty, None).to_numpy(),
            "reason": np.where(empty, REASON_NO_FEATURES, None),
        }
    )
    for col in ("scored_at", "feature_time"):
        out[col] = out[col].astype("datetime64[us, UTC]")
    return out


def output_path(output_dir: Path, model_name: str, version: str, at: datetime) -> Path:
    """`<output_dir>/<model>/v<version>/<at:%Y%m%dT%H%M%S>.parquet`."""
    return Path(output_dir) / model_name / f"v{version}" / f"{require_utc(at):%Y%m%dT%H%M%S}.parquet"


def write_parquet_atomic(frame: pd.DataFrame, path: Path) -> Path:
    """Write to a temp name beside `path`, then rename: readers never see half a file, and a failure
    leaves nothing under the final name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        frame.to_parquet(tmp, index=False)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


class ScoringReport(Result):
    model_name: str
    model_version: str
    feature_service: str
    feature_time: datetime
    scored_at: datetime
    rows: int
    scored_rows: int
    no_feature_rows: int  # entities with every feature missing at feature_time: null score + reason
    imputed_rows: int  # scored rows where at least one feature was missing (imputed by the model)
    null_share: float
    positive_share: float | None  # of scored rows, prediction == 1
    probability_quantiles: dict[str, float]  # min, p10, p50, p90, max, mean of scored rows
    path: str
    seconds: float
    feature_rows_read: int = 0  # offline feature rows the retrieval read (every partition's, summed)

    def to_markdown(self) -> str:
        rows = [
            ("model", f"{self.model_name} v{self.model_version}"),
            ("feature service", self.feature_service),
            ("feature time", self.feature_time.isoformat()),
            ("scored at", self.scored_at.isoformat()),
            ("entities", self.rows),
            ("scored", self.scored_rows),
            ("no features (null score)", f"{self.no_feature_rows} ({self.null_share:.2%})"),
            ("scored with imputed features", self.imputed_rows),
            ("predicted positive", "n/a" if self.positive_share is None else f"{self.positive_share:.2%}"),
            ("offline feature rows read", self.feature_rows_read),
            ("output", f"`{self.path}`"),
            ("seconds", f"{self.seconds:.2f}"),
        ]
        body = "\n".join(f"| {k} | {v} |" for k, v in rows)
        dist = " | ".join(f"{k} {v:.4f}" for k, v in self.probability_quantiles.items()) or "no scored rows"
        warn = ""
        if self.no_feature_rows:
            warn = (
                f"\n**{self.no_feature_rows} entities had no features at {self.feature_time.isoformat()}** "
                "(no feature row within the TTL, or none arrived by then): written with a null score "
                f"and reason `{REASON_NO_FEATURES}`.\n"
            )
        return (
            f"## Batch scoring: {self.model_name} v{self.model_version}\n\n| | |\n|---|---|\n{body}\n{warn}\n"
            f"Probability distribution: {dist}\n"
        )


def summarize(scored: pd.DataFrame, path: Path, seconds: float, feature_rows_read: int = 0) -> ScoringReport:
    """The run's numbers, from the frame that was written."""
    if scored.empty:
        raise FlywheelError("nothing was scored")
    ok = scored["probability"].notna()
    proba = scored.loc[ok, "probability"].to_numpy(dtype=float)
    quantiles: dict[str, float] = {}
    if len(proba):
        qs = np.quantile(proba, [0.0, 0.1, 0.5, 0.9, 1.0])
        quantiles = {k: float(v) for k, v in zip(("min", "p10", "p50", "p90", "max"), qs, strict=True)}
        quantiles["mean"] = float(proba.mean())
    first = scored.iloc[0]
    return ScoringReport(
        model_name=str(first["model_name"]),
        model_version=str(first["model_version"]),
        feature_service=str(first["feature_service"]),
        feature_time=pd.Timestamp(first["feature_time"]).to_pydatetime(),
        scored_at=pd.Timestamp(first["scored_at"]).to_pydatetime(),
        rows=len(scored),
        scored_rows=int(ok.sum()),
        no_feature_rows=int((~ok).sum()),
        imputed_rows=int((ok & scored["imputed_features"].notna()).sum()),
        null_share=float((~ok).mean()),
        positive_share=float((scored.loc[ok, "prediction"] == 1).mean()) if ok.any() else None,
        probability_quantiles=quantiles,
        path=str(path),
        seconds=seconds,
        feature_rows_read=feature_rows_read,
    )


def batch_score(
    reader: OfflineReader,
    model: LoadedModel,
    dataset: DatasetDefinition,
    ids: Sequence[Any] | pd.Series,
    at: datetime,
    output_dir: Path,
    scored_at: datetime,
) -> ScoringReport:
    """Offline features at `at` through the model's service -> predictions -> one parquet file, every row
    stamped `scored_at` (the project clock's now). One retrieval for every id, filtered to their rows like a
    partition's: the whole store when every entity is scored, a few rows for an entities file of a few ids."""
    t0 = time.perf_counter()
    scored = score_partition(reader, model, dataset, list(ids), at, scored_at)
    path = write_parquet_atomic(scored.frame, output_path(output_dir, model.name, model.version, at))
    return summarize(scored.frame, path, time.perf_counter() - t0, scored.feature_rows_read)


@dataclass(frozen=True)
class ScoredPartition:
    frame: pd.DataFrame  # the partition's output rows, in the order of its ids
    feature_rows_read: int  # offline feature rows its retrieval read (its own entities' only)


# (partitions of ids, scored_at) -> one scored partition per partition, in order
PartitionMap = Callable[[list[list[Any]], datetime], list[ScoredPartition]]


def partitions(ids: Sequence[Any] | pd.Series, rows: int) -> list[list[Any]]:
    """The ids in order, `rows` per partition (the last one shorter)."""
    ids = list(ids)
    if not ids:
        raise FlywheelError("no entities to read features for")
    return [ids[i:i + rows] for i in range(0, len(ids), rows)]


def score_partition(reader: OfflineReader, model: LoadedModel, dataset: DatasetDefinition, ids: list[Any],
                    at: datetime, scored_at: datetime) -> ScoredPartition:
    """One partition's output rows, on whatever process runs it: its entities' rows of the offline store,
    joined at `at`, then the model's scores (no Feast, no registry: `reader` carries what the join needs)."""
    features, read = reader.read(dataset, ids, at)
    return ScoredPartition(score_features(model, features, dataset, at, reader.service, scored_at), read)


def batch_score_partitioned(
    model: LoadedModel,
    dataset: DatasetDefinition,
    ids: Sequence[Any] | pd.Series,
    at: datetime,
    output_dir: Path,
    partition_rows: int,
    map_partitions: PartitionMap,
    scored_at: datetime,
) -> ScoringReport:
    """`batch_score` with the entities cut into partitions of `partition_rows`, scored by `map_partitions`
    (e.g. on Dask workers), then joined in order into the same one file, every row with one `scored_at`.
    Each partition reads only its entities' rows, so the partitions together read what one serial pass does."""
    t0 = time.perf_counter()
    done = map_partitions(partitions(ids, partition_rows), scored_at)
    scored = pd.concat([p.frame for p in done], ignore_index=True)
    path = write_parquet_atomic(scored, output_path(output_dir, model.name, model.version, at))
    return summarize(scored, path, time.perf_counter() - t0, sum(p.feature_rows_read for p in done))


# --------------------------------------------------------------------------------------- skew


class SkewMismatch(Result):
    entity: str
    feature: str  # a feature name, or PREDICTION_FEATURE for the model's output
    online: Any
    offline: Any
    difference: float | None = None  # numeric only
    note: str = ""


class SkewReport(Result):
    model_name: str
    model_version: str
    feature_service: str
    offline_time: datetime  # the offline point in time compared (the online store's load time by default)
    entities: list[str]
    tolerance: float
    mismatches: list[SkewMismatch]
    max_prediction_difference: float
    seconds: float

    @property
    def passed(self) -> bool:
        return not self.mismatches

    @property
    def skewed_entities(self) -> list[str]:
        return sorted({m.entity for m in self.mismatches})

    @property
    def skewed_features(self) -> list[str]:
        return sorted({m.feature for m in self.mismatches})

    def summary(self) -> str:
        if self.passed:
            return (
                f"no training-serving skew in {len(self.entities)} sampled entities of {self.model_name} "
                f"v{self.model_version} (max prediction difference {self.max_prediction_difference:.2e})"
            )
        shown = "; ".join(
            f"{self.model_name} entity {m.entity} {m.feature}: online={m.online!r} offline={m.offline!r}"
            + (f" ({m.note})" if m.note else "")
            for m in self.mismatches[:10]
        )
        more = f" (+{len(self.mismatches) - 10} more)" if len(self.mismatches) > 10 else ""
        return (
            f"training-serving skew: {len(self.mismatches)} mismatch(es) in {len(self.skewed_entities)} of "
            f"{len(self.entities)} sampled entities, features {self.skewed_features} (tolerance "
            f"{self.tolerance:g}, offline time {self.offline_time.isoformat()}): {shown}{more}"
        )

    def to_markdown(self, limit: int = 200) -> str:
        verdict = "**PASSED**" if self.passed else f"**FAILED**: {len(self.mismatches)} mismatch(es)"
        head = (
            f"## Training-serving skew: {self.model_name} v{self.model_version}\n\n{verdict}\n\n"
            f"| | |\n|---|---|\n| feature service | {self.feature_service} |\n"
            f"| offline time | {self.offline_time.isoformat()} |\n| sampled entities | {len(self.entities)} |\n"
            f"| tolerance | {self.tolerance:g} |\n| max prediction difference | "
            f"{self.max_prediction_difference:.3g} |\n"
        )
        if self.passed:
            return head
        lines = [
            f"| {m.entity} | {m.feature} | {m.online!r} | {m.offline!r} | "
            f"{'' if m.difference is None else f'{m.difference:.3g}'} | {m.note} |"
            for m in self.mismatches[:limit]
        ]
        more = f"\n… {len(self.mismatches) - limit} more\n" if len(self.mismatches) > limit else ""
        return (
            head + "\n| entity | feature | online | offline | difference | note |\n|---|---|---|---|---|---|\n"
            + "\n".join(lines) + "\n" + more
        )


def _plain(value: Any) -> Any:
    """A JSON-friendly scalar (None for missing)."""
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
        return None
    return value.item() if isinstance(value, np.generic) else value


def compare_vectors(
    online: pd.DataFrame, offline: pd.DataFrame, dataset: DatasetDefinition, tolerance: float
) -> list[SkewMismatch]:
    """Feature by feature, entity by entity (both frames in `model_input` form, same index): numeric
    values within `tolerance`, categorical exact, both missing equal, one missing a mismatch."""
    out: list[SkewMismatch] = []
    for entity in online.index:
        for f in dataset.features:
            a, b = _plain(online.at[entity, f.name]), _plain(offline.at[entity, f.name])
            if a is None and b is None:
                continue
            if a is None or b is None:
                note = (
                    "offline has no value at that time (outside the TTL, or arrived later): online serves a stale one"
                    if b is None else "missing online (not materialized?)"
                )
                out.append(SkewMismatch(entity=str(entity), feature=f.name, online=a, offline=b, note=note))
            elif f.is_numeric:
                diff = abs(float(a) - float(b))
                if diff > tolerance:
                    out.append(SkewMismatch(entity=str(entity), feature=f.name, online=a, offline=b, difference=diff))
            elif str(a) != str(b):
                out.append(SkewMismatch(entity=str(entity), feature=f.name, online=a, offline=b))
    return out


def materialized_until(store: FeatureStore, service_name: str) -> datetime | None:
    """The latest end time the service's views were loaded into the online store up to."""
    service = store.get_feature_service(service_name, allow_cache=False)
    ends: list[datetime] = []
    for proj in service.feature_view_projections:
        view = store.get_feature_view(proj.name, allow_registry_cache=False)
        ends += [end for _, end in view.materialization_intervals]
    if not ends:
        return None
    return max(e if e.tzinfo else e.replace(tzinfo=UTC) for e in ends).astimezone(UTC)


def sample_entities(ids: pd.Series, n: int, seed: int | None = None) -> pd.Series:
    """Up to `n` distinct ids, drawn at random (seeded when `seed` is given)."""
    if len(ids) <= n:
        return ids.reset_index(drop=True)
    return ids.sample(n=n, random_state=seed).sort_values(ignore_index=True)


def check_skew(
    store: FeatureStore,
    model: LoadedModel,
    dataset: DatasetDefinition,
    offline_dir: Path,
    sample: int,
    tolerance: float,
    at: datetime | None = None,
    entities: Sequence[Any] | None = None,
    seed: int | None = None,
) -> SkewReport:
    """Online vs offline feature vectors (and the model's predictions on each) for a sample of entities.

    The offline side is read at `at`, by default the time the online store was loaded up to, so both
    sides should hold the same latest row per entity. Raises SkewError (with the report) on any
    mismatch above `tolerance`.
    """
    t0 = time.perf_counter()
    service = model_feature_service(model)
    if at is None:
        at = materialized_until(store, service)
        if at is None:
            raise FlywheelError(
                f"the views of feature service {service!r} were never loaded into the online store: "
                "materialize first (flywheel feature materialize), then check skew"
            )
    at = require_utc(at)
    if entities is not None:
        ids = _entity_ids(pd.Series(list(entities)), dataset, "skew check entities")
        if ids.empty:
            raise FlywheelError("skew check: the entity list is empty")
    else:
        ids = sample_entities(offline_entities(dataset, offline_dir, at), sample, seed)
    online = online_features(store, service, dataset, ids)
    offline = offline_features(store, service, dataset, ids, at)
    mismatches = compare_vectors(online, offline, dataset, tolerance)

    # the same model on both vectors: a feature difference that moves the score is what matters
    names = dataset.feature_names
    both = ~(online[names].isna().all(axis=1) | offline[names].isna().all(axis=1))
    max_diff = 0.0
    if both.any():
        predictor = served_predictor(model, dataset)  # one build for both sides
        p_on = predictor.predict_frame(online.loc[both.to_numpy()])
        p_off = predictor.predict_frame(offline.loc[both.to_numpy()])
        diffs = np.abs(p_on - p_off)
        max_diff = float(diffs.max())
        for entity, d, a, b in zip(online.index[both.to_numpy()], diffs, p_on, p_off, strict=True):
            if d > tolerance:
                mismatches.append(
                    SkewMismatch(entity=str(entity), feature=PREDICTION_FEATURE, online=float(a), offline=float(b),
                                 difference=float(d))
                )
    report = SkewReport(
        model_name=model.name,
        model_version=str(model.version),
        feature_service=service,
        offline_time=at,
        entities=[str(e) for e in ids],
        tolerance=tolerance,
        mismatches=mismatches,
        max_prediction_difference=max_diff,
        seconds=time.perf_counter() - t0,
    )
    if not report.passed:
        raise SkewError(report.summary(), report)
    return report
