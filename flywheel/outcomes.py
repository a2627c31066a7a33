"""Outcomes (delayed labels): their batches, their table, and the honest join with predictions.

An outcome says what happened to one entity after one feature snapshot: entity, the snapshot's event
time, the label, and when the label ARRIVED. Outcomes land as their own batch files, long after the
predictions they judge (the dataset's `outcomes:` section names the folder; `flywheel data generate
--labels` writes `labels_<arrival date>.parquet`). A batch is validated (fail closed, quarantined, never
deleted) and stored in `flywheel_outcomes` in the project database, idempotently by its content.

The join rule (`join_outcomes`): an outcome counts for a prediction only if
  1. it is about the same entity,
  2. it describes the feature snapshot the prediction used (its event time equals the prediction log's
     `feature_time`, which the service records from the online store), and
  3. the label ARRIVED after the prediction was made, counting the snapshot's FIRST arrival: a label
     already known when the prediction was made is never used, even when it is delivered again later.
So a label-based metric (the rollout's AUC guard, the A/B readout, monitoring) judges a model only on
what it could not have seen. A prediction without a recorded snapshot (a raw-row request that named
none, or a row logged before `feature_time` existed) is never joined.

Pure logic on frames here, plus one small store adapter (`OutcomeStore`, SQLAlchemy on SQLite or
PostgreSQL) and the prediction-log reader for training on served features. No Prefect, no Feast.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import sqlalchemy as sa

from flywheel import migrations
from flywheel.clock import wall_now
from flywheel.db import project_engine
from flywheel.errors import DataValidationError, FlywheelError
from flywheel.schemas import DatasetDefinition, Result
from flywheel.validation import ValidationOutcome

OUTCOMES_TABLE = "flywheel_outcomes"
OUTCOME_BATCHES_TABLE = "flywheel_outcome_batches"
SAMPLES = 5  # sample values named in a validation failure

OUTCOMES = sa.Table(
    OUTCOMES_TABLE,
    migrations.METADATA,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("dataset", sa.String(64), nullable=False),
    sa.Column("entity", sa.String(256), nullable=False),
    sa.Column("event_time", sa.DateTime(timezone=True), nullable=False),  # the snapshot the outcome describes
    sa.Column("label", sa.String(256), nullable=False),  # the declared label value, as text
    sa.Column("arrived_at", sa.DateTime(timezone=True), nullable=False),  # when the label became known
    sa.Column("batch_id", sa.String(64), nullable=False, index=True),
    sa.Column("context", sa.Text, nullable=True),  # JSON of the dataset's context columns, when the batch had them
    sa.Index("ix_flywheel_outcomes_snapshot", "dataset", "entity", "event_time"),
    sa.Index("ix_flywheel_outcomes_arrival", "dataset", "arrived_at"),
)
OUTCOME_BATCHES = sa.Table(
    OUTCOME_BATCHES_TABLE,
    migrations.METADATA,
    sa.Column("batch_id", sa.String(64), primary_key=True),  # sha256 of the batch's normalized content
    sa.Column("dataset", sa.String(64), nullable=False),
    sa.Column("source", sa.String(512), nullable=False),  # the file (or caller) it came from
    sa.Column("rows", sa.Integer, nullable=False),
    sa.Column("ingested_at", sa.DateTime(timezone=True), nullable=False),
)

# the columns of an outcomes frame (as read from the store, and as `join_outcomes` takes them)
OUTCOME_COLUMNS = ["entity", "event_time", "label", "y", "arrived_at", "context"]


class OutcomeIngestReport(Result):
    dataset: str
    batch_id: str
    source: str
    skipped: bool  # True: a batch with this content was stored before; nothing was added
    rows: int  # rows added (0 when skipped)
    total_rows: int  # outcome rows of the dataset after this ingest


# ------------------------------------------------------------------------------------ validation


def validate_outcomes(df: pd.DataFrame, dataset: DatasetDefinition, batch_name: str) -> ValidationOutcome:
    """Check one outcome batch: columns, entity type, label values, UTC timestamps, arrival not before
    the snapshot, one label per snapshot. Failures are reported the way feature batches report theirs."""
    cfg = _outcomes_cfg(dataset)
    arrival = dataset.label_timestamp
    assert arrival is not None  # checked by DatasetDefinition
    failures: list[dict[str, Any]] = []
    required = [dataset.entity, dataset.timestamp, dataset.label, arrival]
    for col in required:
        if col not in df.columns:
            failures.append({"expectation": "ExpectColumnToExist", "column": col, "observed_value": None,
                             "detail": f"column {col!r} not in batch; columns: {sorted(map(str, df.columns))}"})
    if failures:
        return ValidationOutcome(batch=batch_name, success=False, row_count=len(df), failures=failures)
    if df.empty:
        failures.append({"expectation": "ExpectTableRowCountToBeBetween", "column": None, "observed_value": 0,
                         "detail": "an outcome batch with no rows"})
        return ValidationOutcome(batch=batch_name, success=False, row_count=0, failures=failures)

    n = len(df)
    for col in required:
        _add(failures, "ExpectColumnValuesToNotBeNull", col, df[col].isna(), df[col], n)
    entity = df[dataset.entity]
    if dataset.entity_type == "int" and pd.api.types.is_integer_dtype(entity.dtype):
        bad_entity = pd.Series(False, index=entity.index)  # int64 / Int64: integers by type
    else:
        bad_entity = entity.notna() & ~entity.astype(object).map(lambda v: _entity_ok(v, dataset.entity_type))
    _add(failures, "ExpectColumnValuesToBeInTypeList", dataset.entity, bad_entity, entity, n,
         f"entity ids must be {'integers' if dataset.entity_type == 'int' else 'strings'}")
    labels = df[dataset.label]
    allowed = _canonical_labels(cfg.label_values)
    bad_label = labels.notna() & ~labels.map(lambda v: _label_key(v) in allowed)
    _add(failures, "ExpectColumnValuesToBeInSet", dataset.label, bad_label, labels, n,
         f"labels must be one of {cfg.label_values}")
    times: dict[str, pd.Series] = {}
    for col in (dataset.timestamp, arrival):
        series = df[col]
        if not isinstance(series.dtype, pd.DatetimeTZDtype):
            failures.append({"expectation": "ExpectColumnValuesToBeOfType", "column": col,
                             "observed_value": str(series.dtype),
                             "detail": f"{col!r} must hold timezone-aware (UTC) timestamps, got {series.dtype}"})
        else:
            times[col] = series.dt.tz_convert(UTC)
    if len(times) == 2:
        event, arrived = times[dataset.timestamp], times[arrival]
        early = event.notna() & arrived.notna() & (arrived < event)
        described = entity.astype(str) + " @ " + event.astype(str) + " arrived " + arrived.astype(str)
        _add(failures, "ExpectOutcomeNotToArriveBeforeItsSnapshot", arrival, early, described, n,
             f"{arrival!r} is before the snapshot time {dataset.timestamp!r}")
        keyed = pd.DataFrame({"e": entity.astype(str), "t": event, "y": labels.map(_label_key)})
        conflicts = keyed.groupby(["e", "t"])["y"].transform("nunique") > 1
        _add(failures, "ExpectOneLabelPerSnapshot", dataset.label, conflicts,
             keyed["e"] + " @ " + keyed["t"].astype(str), n, "one snapshot carries different labels in this batch")
    return ValidationOutcome(batch=batch_name, success=not failures, row_count=n, failures=failures)


def _add(failures: list[dict[str, Any]], expectation: str, column: str, mask: pd.Series, values: pd.Series,
         n: int, detail: str = "") -> None:
    count = int(mask.sum())
    if not count:
        return
    samples = [_jsonable(v) for v in values[mask].head(SAMPLES)]
    failure = {"expectation": expectation, "column": column, "unexpected_count": count,
               "unexpected_percent": round(100.0 * count / n, 4), "sample_values": samples}
    if detail:
        failure["detail"] = detail
    failures.append(failure)


def _jsonable(value: Any) -> Any:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if hasattr(value, "isoformat"):
        return value.isoformat()
    if hasattr(value, "item"):
        return value.item()
    return value if isinstance(value, str | int | float | bool) else str(value)


def _entity_ok(value: Any, kind: str) -> bool:
    if kind == "int":
        return isinstance(value, int | np.integer) and not isinstance(value, bool | np.bool_)
    return isinstance(value, str)


def _canonical_labels(values: Sequence[Any]) -> dict[Any, str]:
    """Declared label value -> its stored text. Keyed by value, so 1.0 finds 1 and np.str_ finds str."""
    return {v: str(v) for v in values}


def _label_key(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


def _outcomes_cfg(dataset: DatasetDefinition) -> Any:
    if dataset.outcomes is None:
        raise FlywheelError(f"dataset {dataset.name!r} declares no `outcomes:` section: it does not collect "
                            "delayed labels (see README, 'Outcomes (delayed labels)')")
    return dataset.outcomes


# ------------------------------------------------------------------------------------ batches


def outcome_rows(df: pd.DataFrame, dataset: DatasetDefinition) -> pd.DataFrame:
    """A validated batch in the table's shape: entity (text), event_time and arrived_at (UTC, microseconds),
    label (the declared value as text), context (JSON of the context columns present, else None). Exact
    duplicate rows are dropped."""
    cfg = _outcomes_cfg(dataset)
    canon = _canonical_labels(cfg.label_values)
    assert dataset.label_timestamp is not None
    out = pd.DataFrame({
        "entity": df[dataset.entity].map(lambda v: str(_label_key(v))).to_numpy(),
        "event_time": _utc(df[dataset.timestamp]).array,
        "label": df[dataset.label].map(lambda v: canon[_label_key(v)]).to_numpy(),
        "arrived_at": _utc(df[dataset.label_timestamp]).array,
    })
    context = [c for c in dataset.context_columns if c in df.columns]
    if context:
        out["context"] = [json.dumps({c: _jsonable(v) for c, v in zip(context, row, strict=True)}, sort_keys=True)
                          for row in df[context].itertuples(index=False, name=None)]
    else:
        out["context"] = None
    return out.drop_duplicates().reset_index(drop=True)


def content_id(rows: pd.DataFrame, dataset: DatasetDefinition) -> str:
    """sha256 of a batch's normalized rows (order-free): the same outcomes give the same id, whatever the
    file name, format or row order."""
    ordered = rows.sort_values(["entity", "event_time", "arrived_at", "label"], kind="stable")
    text = ordered.to_csv(index=False, date_format="%Y-%m-%dT%H:%M:%S.%f%z")
    return hashlib.sha256(f"{dataset.name}\n{text}".encode()).hexdigest()


def read_outcome_batch(path: Path, dataset: DatasetDefinition) -> pd.DataFrame:
    """Read one outcome batch file (parquet or CSV; CSV timestamps parsed as UTC)."""
    from flywheel.validation import read_batch

    return read_batch(Path(path), dataset, None if Path(path).suffix else _outcomes_cfg(dataset).format)


def ingest_outcome_file(path: Path, dataset: DatasetDefinition, url: str, quarantine_dir: Path,
                        ingested_at: datetime | None = None) -> OutcomeIngestReport:
    """Read, validate and store one outcome batch, stamped `ingested_at` (entry points pass the project clock's
    now). A batch that fails validation (or cannot be read) is moved to `quarantine_dir` with its report and
    DataValidationError names every failure."""
    from flywheel.validation import quarantine_batch

    path = Path(path)
    if not path.is_file():
        raise FlywheelError(f"outcome batch not found: {path}")
    _outcomes_cfg(dataset)
    try:
        df = read_outcome_batch(path, dataset)
    except Exception as exc:  # an unreadable file is a failed batch too
        outcome = ValidationOutcome(batch=path.name, success=False, row_count=0, failures=[
            {"expectation": "ReadBatch", "column": None, "observed_value": None,
             "error": f"{type(exc).__name__}: {exc}"}])
    else:
        outcome = validate_outcomes(df, dataset, path.name)
    if not outcome.success:
        moved = quarantine_batch(path, quarantine_dir, outcome)
        raise DataValidationError(outcome.batch, outcome.failures, str(moved))
    store = OutcomeStore(url)
    try:
        return store.ingest(outcome_rows(df, dataset), dataset, source=str(path), ingested_at=ingested_at)
    finally:
        store.close()


# ------------------------------------------------------------------------------------ the store


class OutcomeStore:
    """`flywheel_outcomes` (one row per stored outcome) and `flywheel_outcome_batches` (one row per batch
    content, the idempotency guard), in the project database."""

    def __init__(self, url: str) -> None:
        self.engine = project_engine(url, "outcomes")
        migrations.ensure(self.engine, [OUTCOMES, OUTCOME_BATCHES])

    def close(self) -> None:
        self.engine.dispose()

    def ingest(self, rows: pd.DataFrame, dataset: DatasetDefinition, source: str,
               ingested_at: datetime | None = None) -> OutcomeIngestReport:
        """Store normalized rows (`outcome_rows`) as one batch, stamped `ingested_at` (the volume trigger counts
        from it; entry points pass the project clock's now, the wall clock is only a library default); a batch
        whose content is already stored adds nothing (also when two processes ingest it at once: the batch
        row's primary key decides)."""
        batch = content_id(rows, dataset)
        records = [
            {"dataset": dataset.name, "entity": r.entity, "event_time": self._time(r.event_time), "label": r.label,
             "arrived_at": self._time(r.arrived_at), "batch_id": batch, "context": r.context}
            for r in rows.itertuples(index=False)
        ]
        skipped = False
        try:
            with self.engine.begin() as conn:
                if conn.execute(sa.select(OUTCOME_BATCHES.c.batch_id).where(OUTCOME_BATCHES.c.batch_id == batch)
                                ).first():
                    skipped = True
                else:
                    conn.execute(OUTCOME_BATCHES.insert().values(
                        batch_id=batch, dataset=dataset.name, source=source[-512:], rows=len(records),
                        ingested_at=self._time(ingested_at or wall_now())))
                    if records:
                        conn.execute(OUTCOMES.insert(), records)
        except sa.exc.IntegrityError:
            skipped = True  # the same content, stored meanwhile by another process
        return OutcomeIngestReport(dataset=dataset.name, batch_id=batch, source=source, skipped=skipped,
                                   rows=0 if skipped else len(records), total_rows=self.count(dataset.name))

    def rows_ingested(self, dataset: str, when: Callable[[datetime], bool]) -> int:
        """How many outcomes the dataset's batches stored whose ingestion time passes `when`."""
        q = sa.select(OUTCOME_BATCHES.c.rows, OUTCOME_BATCHES.c.ingested_at).where(OUTCOME_BATCHES.c.dataset == dataset)
        with self.engine.connect() as conn:
            return sum(int(r.rows) for r in conn.execute(q) if when(r.ingested_at))

    def count(self, dataset: str) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(OUTCOMES)
                                    .where(OUTCOMES.c.dataset == dataset)).scalar_one())

    def arrivals(self, dataset: str, after: datetime | None, as_of: datetime) -> tuple[int, datetime | None]:
        """(outcome rows that arrived in (`after`, `as_of`], the latest arrival at or before `as_of`): what the
        volume trigger counts and the liveness check watches."""
        o = OUTCOMES
        known = sa.and_(o.c.dataset == dataset, o.c.arrived_at <= self._time(as_of))
        count = sa.select(sa.func.count()).select_from(o).where(known)
        if after is not None:
            count = count.where(o.c.arrived_at > self._time(after))
        with self.engine.connect() as conn:
            n = int(conn.execute(count).scalar_one())
            last = conn.execute(sa.select(sa.func.max(o.c.arrived_at)).where(known)).scalar_one()
        return n, (_stamp(last).to_pydatetime() if last is not None else None)

    def read(self, dataset: DatasetDefinition, as_of: datetime,
             arrived_since: datetime | None = None) -> pd.DataFrame:
        """The dataset's outcomes known at `as_of` (the project clock's time): OUTCOME_COLUMNS, `y` 1 for the positive
        label. With `arrived_since`, only snapshots with an arrival after it, but then with ALL their
        arrivals up to `as_of` (the join needs each snapshot's first arrival to refuse labels known early)."""
        o = OUTCOMES
        q = sa.select(o.c.entity, o.c.event_time, o.c.label, o.c.arrived_at, o.c.context).where(
            o.c.dataset == dataset.name, o.c.arrived_at <= self._time(as_of))
        if arrived_since is not None:
            later = OUTCOMES.alias("later")
            q = q.where(sa.exists().where(
                later.c.dataset == o.c.dataset, later.c.entity == o.c.entity, later.c.event_time == o.c.event_time,
                later.c.arrived_at > self._time(arrived_since), later.c.arrived_at <= self._time(as_of)))
        with self.engine.connect() as conn:
            frame = pd.DataFrame([tuple(r) for r in conn.execute(q.order_by(o.c.id))],
                                 columns=["entity", "event_time", "label", "arrived_at", "context"])
        return outcomes_frame(frame, dataset)

    def _time(self, value: Any) -> datetime:
        # SQLite keeps no offset: store and compare naive UTC there (the prediction log does the same)
        ts = pd.Timestamp(value)
        ts = ts.tz_localize(UTC) if ts.tzinfo is None else ts.tz_convert(UTC)
        dt = ts.to_pydatetime()
        return dt.replace(tzinfo=None) if self.engine.dialect.name == "sqlite" else dt


def outcomes_frame(frame: pd.DataFrame, dataset: DatasetDefinition) -> pd.DataFrame:
    """entity/event_time/label/arrived_at(/context) rows -> OUTCOME_COLUMNS with `y` from the positive label."""
    positive = str(dataset.positive_label)
    out = pd.DataFrame({
        "entity": frame["entity"].astype(str).to_numpy() if len(frame) else np.array([], dtype=object),
        "event_time": _utc(frame["event_time"]).array,
        "label": frame["label"].astype(str).to_numpy() if len(frame) else np.array([], dtype=object),
        "arrived_at": _utc(frame["arrived_at"]).array,
        "context": frame["context"].to_numpy() if "context" in frame else None,
    })
    out["y"] = (out["label"] == positive).astype(int)
    return out[OUTCOME_COLUMNS]


def read_outcomes(url: str, dataset: DatasetDefinition, as_of: datetime,
                  arrived_since: datetime | None = None) -> pd.DataFrame:
    """`OutcomeStore(url).read(...)` in one call (an empty frame when the dataset collects no outcomes)."""
    store = OutcomeStore(url)
    try:
        return store.read(dataset, as_of, arrived_since)
    finally:
        store.close()


# ------------------------------------------------------------------------------------ the join

JOIN_COLUMNS = ["y", "outcome_arrived_at"]


def join_outcomes(predictions: pd.DataFrame, outcomes: pd.DataFrame | None,
                  as_of: datetime | None = None) -> pd.DataFrame:
    """Each prediction with the outcome of the snapshot it used, when that outcome arrived after it.

    `predictions`: `entity`, `at` (when it was made), `feature_time` (event time of the feature snapshot it
    used; null: unknown), other columns carried along. `outcomes`: `entity`, `event_time`, `y`, `arrived_at`
    (a snapshot may have several rows: re-deliveries, corrections). Outcomes arrived after `as_of` are not
    known yet. Per snapshot, its FIRST arrival decides: a prediction made at or after it is not joined (the
    label was already known); the value is the LATEST arrived (a correction replaces an earlier value).

    Returns the joined predictions (their columns, in their order, original index) plus `y` (0/1) and
    `outcome_arrived_at` (the first arrival); each prediction appears at most once.
    """
    columns = [*predictions.columns, *[c for c in JOIN_COLUMNS if c not in predictions.columns]]
    empty = pd.DataFrame({c: pd.Series(dtype=predictions[c].dtype if c in predictions else object)
                          for c in columns})
    if outcomes is None or outcomes.empty or predictions.empty or "feature_time" not in predictions:
        return empty
    o = pd.DataFrame({"entity": outcomes["entity"].astype(str).to_numpy(),
                      "event_time": _utc(outcomes["event_time"]).array,
                      "y": outcomes["y"].astype(int).to_numpy(), "arrived_at": _utc(outcomes["arrived_at"]).array})
    if as_of is not None:
        o = o[o["arrived_at"] <= _stamp(as_of)]
    if o.empty:
        return empty
    o = o.sort_values("arrived_at", kind="stable")
    snapshots = (o.groupby(["entity", "event_time"], sort=False)
                 .agg(y=("y", "last"), outcome_arrived_at=("arrived_at", "first")).reset_index())
    usable = predictions["entity"].notna() & predictions["feature_time"].notna()
    p = predictions[usable]
    keys = pd.DataFrame({"entity": p["entity"].astype(str).to_numpy(), "event_time": _utc(p["feature_time"]).array,
                         "at": _utc(p["at"]).array, "_pos": np.arange(len(p))})
    m = keys.merge(snapshots, on=["entity", "event_time"], how="inner")  # one snapshot row per key: m:1
    m = m[m["outcome_arrived_at"] > m["at"]].sort_values("_pos", kind="stable")
    joined = p.iloc[m["_pos"].to_numpy()].copy()
    joined["y"] = m["y"].to_numpy(int)
    joined["outcome_arrived_at"] = m["outcome_arrived_at"].array
    return joined


def _utc(values: Any) -> pd.Series:
    """Timestamps as datetime64[us, UTC]; naive values are taken as UTC (SQLite returns them so)."""
    series = values if isinstance(values, pd.Series) else pd.Series(values)
    return pd.to_datetime(series, utc=True).astype("datetime64[us, UTC]")


def _stamp(value: Any) -> pd.Timestamp:
    ts = pd.Timestamp(value)
    return ts.tz_localize(UTC) if ts.tzinfo is None else ts.tz_convert(UTC)


# ------------------------------------------------------------------------------ served features


class ServedTrainingReport(Result):
    predictions: int  # logged predictions with a recorded snapshot, made by `as_of`
    snapshots: int  # distinct (entity, snapshot) among them
    with_outcome: int  # snapshots whose outcome had arrived by `as_of`: the training rows
    as_of: datetime


def read_served(log_url: str, model: str, as_of: datetime | None = None) -> pd.DataFrame:
    """Logged predictions of `model` that recorded their feature snapshot: entity, at, feature_time,
    features (decoded), oldest first. Empty when the log (or its `feature_time` column) does not exist."""
    from flywheel.predictionlog import PREDICTIONS_TABLE

    cols = ["entity", "at", "feature_time", "features"]
    engine = project_engine(log_url, "prediction log")
    try:
        try:
            t = sa.Table(PREDICTIONS_TABLE, sa.MetaData(), autoload_with=engine)
        except sa.exc.NoSuchTableError:
            return pd.DataFrame(columns=cols)
        if "feature_time" not in t.c:
            return pd.DataFrame(columns=cols)
        q = sa.select(t.c.entity, t.c.at, t.c.feature_time, t.c.features).where(
            t.c.model == model, t.c.feature_time.is_not(None), t.c.entity.is_not(None))
        if as_of is not None:
            at = _stamp(as_of).to_pydatetime()
            q = q.where(t.c.at <= (at.replace(tzinfo=None) if engine.dialect.name == "sqlite" else at))
        with engine.connect() as conn:
            rows = [tuple(r) for r in conn.execute(q.order_by(t.c.id))]
    finally:
        engine.dispose()
    frame = pd.DataFrame(rows, columns=cols)
    frame["features"] = [json.loads(f) for f in frame["features"]]
    return frame


def served_training_frame(served: pd.DataFrame, outcomes: pd.DataFrame, dataset: DatasetDefinition,
                          as_of: datetime) -> tuple[pd.DataFrame, ServedTrainingReport]:
    """A training frame from the features the service actually used, joined with their outcomes.

    `served`: entity, at, feature_time, features (dict per prediction); `outcomes`: OUTCOME_COLUMNS.
    One row per (entity, snapshot) that was served by `as_of` and whose outcome had arrived by `as_of`:
    the dataset's entity, `timestamp` (= the snapshot's event time, as in the offline store's frame),
    label (the declared value), features (the served values; a feature the serving model did not take is
    null) and context columns (from the outcome batch, null when it carried none). Unlike a metric,
    training does not need the label to arrive after the prediction: no prediction is being judged, and
    the features are the snapshot's own, served before `as_of`.
    """
    cut = _stamp(as_of)
    s = served[served["feature_time"].notna() & served["entity"].notna()]
    s = s.assign(entity=s["entity"].astype(str), feature_time=_utc(s["feature_time"]).array,
                 at=_utc(s["at"]).array)
    s = s[s["at"] <= cut]
    predictions = len(s)
    s = s.sort_values("at", kind="stable").drop_duplicates(["entity", "feature_time"], keep="last")
    o = outcomes[_utc(outcomes["arrived_at"]) <= cut] if len(outcomes) else outcomes
    if len(o):
        o = (o.assign(entity=o["entity"].astype(str), event_time=_utc(o["event_time"]).array,
                      arrived_at=_utc(o["arrived_at"]).array)
             .sort_values("arrived_at", kind="stable")
             .drop_duplicates(["entity", "event_time"], keep="last"))  # the latest value of each snapshot
        m = s.merge(o[["entity", "event_time", "label", "context"]], left_on=["entity", "feature_time"],
                    right_on=["entity", "event_time"], how="inner")
    else:
        m = s.iloc[:0].assign(label=pd.Series(dtype=object), context=pd.Series(dtype=object))
    labels = {str(v): v for v in _outcomes_cfg(dataset).label_values}
    out = pd.DataFrame({
        dataset.entity: (m["entity"].astype("int64") if dataset.entity_type == "int" else m["entity"]).to_numpy(),
        dataset.timestamp: _utc(m["feature_time"]).array,
        dataset.label: m["label"].map(labels).to_numpy(),
    })
    features = list(m["features"])
    for f in dataset.features:
        values = [row.get(f.name) for row in features]
        out[f.name] = pd.to_numeric(pd.Series(values, dtype=object)) if f.type in ("float", "int") else values
    contexts = [json.loads(c) if isinstance(c, str) else {} for c in m["context"]]
    for c in dataset.context_columns:
        out[c] = [ctx.get(c) for ctx in contexts]
    out = out.sort_values([dataset.timestamp, dataset.entity], kind="stable").reset_index(drop=True)
    report = ServedTrainingReport(predictions=predictions, snapshots=len(s), with_outcome=len(out),
                                  as_of=cut.to_pydatetime())
    return out, report


def load_served_training_set(log_url: str, outcomes_url: str, dataset: DatasetDefinition, model: str,
                             as_of: datetime) -> tuple[pd.DataFrame, ServedTrainingReport]:
    """`served_training_frame` on the prediction log of `model` and the dataset's stored outcomes; fails
    (FlywheelError, naming the count and the minimum) when fewer than `outcomes.min_training_rows` served
    snapshots have an outcome yet: a run asked to train on served features never falls back to the offline store."""
    served = read_served(log_url, model, as_of)
    outcomes = read_outcomes(outcomes_url, dataset, as_of)
    frame, report = served_training_frame(served, outcomes, dataset, as_of)
    check_served_rows(report, _outcomes_cfg(dataset).min_training_rows, model)
    return frame, report


def check_served_rows(report: ServedTrainingReport, minimum: int, model: str) -> None:
    """Too few served snapshots joined with an outcome to train on: FlywheelError naming the count and the minimum."""
    if report.with_outcome < minimum:
        raise FlywheelError(
            f"too few training rows from served features of {model!r}: {report.with_outcome} served snapshot(s) with "
            f"an outcome known at {report.as_of.isoformat()}, the minimum is {minimum} (outcomes.min_training_rows "
            f"in the dataset definition); {report.predictions} logged prediction(s) with a recorded snapshot, "
            f"{report.snapshots} snapshot(s). Not falling back to the offline store: ingest more outcome batches "
            "(`flywheel outcomes ingest`) or train on the offline store")
