"""Seeded synthetic customer-churn data, in daily batches, with knobs for drift and data faults.

Pure: returns DataFrames; `write_batches` and `write_label_batches` are the only functions that touch
disk. The same seed and arguments give the same bytes (each day draws from its own generator seeded by
(seed, day)).

Labels (did the customer churn within 30 days of the snapshot?) become known LABEL_DELAY after the
snapshot (`label_available_at`). Besides riding in each snapshot's row (the offline training set reads
them there, as known at its `as_of`), they can be written as the outcome batches a production system
would receive: `labels_<arrival date>.parquet`, one per day on which labels arrive, each row the entity,
the snapshot's event time, the label, its arrival time and the context columns (`label_batches`).
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

REGIONS = ["north", "south", "east", "west"]
SEGMENTS = ["consumer", "smb", "enterprise"]
CONTRACTS = ["monthly", "annual", "two_year"]
PAYMENTS = ["card", "bank_transfer", "invoice", "wallet"]
AGE_GROUPS = ["18-34", "35-54", "55+"]
LABEL_DELAY = timedelta(days=30)
# an outcome batch: entity, the snapshot it describes, the label, when it arrived, context (not a feature)
LABEL_COLUMNS = ["customer_id", "event_timestamp", "churned", "label_available_at", "age_group"]


class DriftSpec(BaseModel):
    """Strengths in [0, 1]. Covariate drift moves the inputs; concept drift moves the input->label rule."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    covariate: float = Field(0.0, ge=0, le=1)
    concept: float = Field(0.0, ge=0, le=1)


class FaultSpec(BaseModel):
    """Data-quality faults to inject into a batch."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    missing: dict[str, float] = {}  # column -> share of rows set to null
    out_of_range: dict[str, float] = {}  # column -> share of rows pushed far past the valid range
    rename: dict[str, str] = {}  # old column name -> new
    retype: dict[str, str] = {}  # column -> "string" (numbers become text)


class GeneratorSpec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    seed: int = 42
    days: int = Field(28, ge=1, le=3650)
    rows_per_day: int = Field(1000, ge=1, le=10_000_000)
    customers: int = Field(20_000, ge=1)
    start: date = date(2026, 1, 1)
    late_share: float = Field(0.01, ge=0, le=1)  # rows that arrive days after their event time
    drift: DriftSpec = DriftSpec()
    faults: FaultSpec = FaultSpec()
    drift_from_day: int = Field(0, ge=0)  # drift/faults apply to days >= this index


def _customers(seed: int, n: int) -> pd.DataFrame:
    """Static customer attributes, fixed by the seed."""
    rng = np.random.default_rng([seed, 0])
    age = rng.choice(AGE_GROUPS, size=n, p=[0.35, 0.40, 0.25])
    base_tenure = rng.gamma(2.0, 18.0, size=n)
    base_tenure += np.where(age == "55+", 10.0, 0.0)  # mild, realistic correlation with age
    return pd.DataFrame(
        {
            "customer_id": np.arange(1, n + 1, dtype=np.int64),
            "region": rng.choice(REGIONS, size=n, p=[0.3, 0.25, 0.25, 0.2]),
            "segment": rng.choice(SEGMENTS, size=n, p=[0.6, 0.3, 0.1]),
            "age_group": age,
            "base_tenure": base_tenure,
            "base_charges": rng.lognormal(4.2, 0.45, size=n),
            "contract_type": rng.choice(CONTRACTS, size=n, p=[0.55, 0.3, 0.15]),
            "payment_method": rng.choice(PAYMENTS, size=n, p=[0.4, 0.3, 0.15, 0.15]),
            "num_products": rng.integers(1, 6, size=n),
        }
    )


def generate_day(spec: GeneratorSpec, day_index: int, customers: pd.DataFrame | None = None) -> pd.DataFrame:
    """One day's batch: a snapshot of `rows_per_day` customers with their 30-day churn label."""
    customers = _customers(spec.seed, spec.customers) if customers is None else customers
    rng = np.random.default_rng([spec.seed, 1, day_index])
    n = spec.rows_per_day
    day_start = datetime.combine(spec.start, datetime.min.time(), tzinfo=UTC) + timedelta(days=day_index)
    drifted = day_index >= spec.drift_from_day
    cov = spec.drift.covariate if drifted else 0.0
    con = spec.drift.concept if drifted else 0.0

    idx = rng.choice(len(customers), size=n, replace=len(customers) < n)
    c = customers.iloc[idx].reset_index(drop=True)
    seconds = np.sort(rng.integers(0, 86_400, size=n))
    event_ts = pd.to_datetime(day_start) + pd.to_timedelta(seconds, unit="s")
    tenure = np.clip(c["base_tenure"].to_numpy() + day_index / 30.0 - cov * 12.0, 0, 240).round().astype(np.int64)
    charges = np.clip(c["base_charges"].to_numpy() * (1 + 0.6 * cov) + rng.normal(0, 3, n), 0, 1000).round(2)
    tickets = rng.poisson(1.2 + 2.0 * cov, size=n).astype(np.int64)
    sessions = np.clip(rng.gamma(3.0, 20.0, size=n) * (1 - 0.4 * cov), 0, 1440).round(1)
    delay = np.clip(rng.exponential(4.0 + 6 * cov, size=n), 0, 365).round().astype(np.int64)
    products = c["num_products"].to_numpy().astype(np.int64)

    contract_w = c["contract_type"].map({"monthly": 1.0, "annual": -0.4, "two_year": -1.4}).to_numpy()
    segment_w = c["segment"].map({"consumer": 0.2, "smb": 0.0, "enterprise": -0.4}).to_numpy()
    # concept drift: ticket sensitivity weakens, price sensitivity and session effect flip
    logit = (
        -2.2
        + (0.45 - 0.35 * con) * tickets
        - 0.03 * tenure
        + (0.012 + 0.02 * con) * (charges - 70)
        + 0.05 * delay
        - 0.25 * (products - 1)
        + (-0.01 + 0.02 * con) * (sessions - 60)
        + contract_w
        + segment_w
    )
    prob = 1 / (1 + np.exp(-logit))
    churned = np.where(rng.random(n) < prob, "yes", "no")
    lag = rng.integers(60, 3600, size=n)
    late = rng.random(n) < spec.late_share
    lag = np.where(late, rng.integers(2 * 86_400, 5 * 86_400, size=n), lag)

    df = pd.DataFrame(
        {
            "customer_id": c["customer_id"].to_numpy(),
            "event_timestamp": event_ts,
            "ingested_at": event_ts + pd.to_timedelta(lag, unit="s"),
            "label_available_at": event_ts + LABEL_DELAY,
            "tenure_months": tenure,
            "monthly_charges": charges,
            "support_tickets_30d": tickets,
            "avg_session_minutes": sessions,
            "payment_delay_days": delay,
            "num_products": products,
            "contract_type": c["contract_type"].to_numpy(),
            "payment_method": c["payment_method"].to_numpy(),
            "region": c["region"].to_numpy(),
            "segment": c["segment"].to_numpy(),
            "age_group": c["age_group"].to_numpy(),
            "churned": churned,
        }
    )
    # small natural missingness in optional fields
    for col, share in (("avg_session_minutes", 0.02), ("payment_method", 0.01)):
        df.loc[rng.random(n) < share, col] = None
    return apply_faults(df, spec.faults if drifted else FaultSpec(), rng)


def apply_faults(df: pd.DataFrame, faults: FaultSpec, rng: np.random.Generator) -> pd.DataFrame:
    df = df.copy()
    for col, share in faults.missing.items():
        _require(df, col)
        df.loc[rng.random(len(df)) < share, col] = None
    for col, share in faults.out_of_range.items():
        _require(df, col)
        mask = rng.random(len(df)) < share
        df[col] = df[col].astype("float64")
        df.loc[mask, col] = -999.0
    for col, kind in faults.retype.items():
        _require(df, col)
        if kind != "string":
            raise ValueError(f"retype supports only 'string', got {kind!r} for {col}")
        df[col] = df[col].astype(str)
    if faults.rename:
        for col in faults.rename:
            _require(df, col)
        df = df.rename(columns=faults.rename)
    return df


def _require(df: pd.DataFrame, col: str) -> None:
    if col not in df.columns:
        raise ValueError(f"fault names unknown column {col!r}; columns: {list(df.columns)}")


def generate(spec: GeneratorSpec) -> list[tuple[date, pd.DataFrame]]:
    customers = _customers(spec.seed, spec.customers)
    return [(spec.start + timedelta(days=d), generate_day(spec, d, customers)) for d in range(spec.days)]


def write_batches(spec: GeneratorSpec, out_dir: Path, fmt: str = "parquet") -> list[Path]:
    """Write one file per day, `batch_YYYY-MM-DD.<fmt>`; returns the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for day, df in generate(spec):
        path = out_dir / f"batch_{day.isoformat()}.{fmt}"
        if fmt == "parquet":
            df.to_parquet(path, index=False)
        elif fmt == "csv":
            df.to_csv(path, index=False)
        else:
            raise ValueError(f"format must be parquet or csv, got {fmt!r}")
        paths.append(path)
    return paths


def label_batches(days: list[tuple[date, pd.DataFrame]]) -> list[tuple[date, pd.DataFrame]]:
    """The outcome batches of generated snapshot batches: their labels grouped by the UTC day they arrive
    on (`label_available_at`), oldest first; each row LABEL_COLUMNS."""
    frames = [df[[c for c in LABEL_COLUMNS if c in df.columns]] for _, df in days]
    if not frames:
        return []
    labels = pd.concat(frames, ignore_index=True).sort_values(["label_available_at", "customer_id"], kind="stable")
    arrival_day = labels["label_available_at"].dt.tz_convert(UTC).dt.date
    return [(day, group.reset_index(drop=True)) for day, group in labels.groupby(arrival_day, sort=True)]


def write_label_batches(spec: GeneratorSpec, out_dir: Path, fmt: str = "parquet") -> list[Path]:
    """Write the outcome batches of `spec`'s snapshots, `labels_YYYY-MM-DD.<fmt>` per arrival day."""
    if fmt not in ("parquet", "csv"):
        raise ValueError(f"format must be parquet or csv, got {fmt!r}")
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for day, df in label_batches(generate(spec)):
        path = out_dir / f"labels_{day.isoformat()}.{fmt}"
        if fmt == "parquet":
            df.to_parquet(path, index=False)
        else:
            df.to_csv(path, index=False)
        paths.append(path)
    return paths
