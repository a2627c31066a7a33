"""The synthetic generator: deterministic bytes, realistic shape, working drift and fault knobs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from flywheel.datagen import DriftSpec, FaultSpec, GeneratorSpec, generate, generate_day, write_batches


def test_same_seed_same_bytes(tmp_path: Path) -> None:
    spec = GeneratorSpec(seed=3, days=3, rows_per_day=200, customers=500)
    a = write_batches(spec, tmp_path / "a")
    b = write_batches(spec, tmp_path / "b")
    assert [p.name for p in a] == ["batch_2026-01-01.parquet", "batch_2026-01-02.parquet", "batch_2026-01-03.parquet"]
    assert all(x.read_bytes() == y.read_bytes() for x, y in zip(a, b, strict=True))
    c = write_batches(spec.model_copy(update={"seed": 4}), tmp_path / "c")
    assert a[0].read_bytes() != c[0].read_bytes()


def test_csv_output_is_deterministic_too(tmp_path: Path) -> None:
    spec = GeneratorSpec(seed=3, days=1, rows_per_day=50, customers=100)
    (a,), (b,) = write_batches(spec, tmp_path / "a", "csv"), write_batches(spec, tmp_path / "b", "csv")
    assert a.read_bytes() == b.read_bytes() and a.suffix == ".csv"


def test_shape_labels_and_timestamps(dataset) -> None:
    spec = GeneratorSpec(seed=1, days=2, rows_per_day=1000, customers=3000)
    (d0, day0), (_, day1) = generate(spec)
    assert set(dataset.required_columns) <= set(day0.columns)
    assert len(day0) == 1000
    assert day0["event_timestamp"].dt.tz is not None
    assert (day0["event_timestamp"].dt.date == d0).all()
    assert (day0["label_available_at"] > day0["event_timestamp"]).all(), "labels arrive later than features"
    assert (day0["ingested_at"] >= day0["event_timestamp"]).all()
    assert 0.03 < (day0["churned"] == "yes").mean() < 0.4
    assert day1["event_timestamp"].min() > day0["event_timestamp"].max()


def test_covariate_drift_moves_inputs() -> None:
    base = generate_day(GeneratorSpec(seed=1, rows_per_day=3000), 0)
    drifted = generate_day(GeneratorSpec(seed=1, rows_per_day=3000, drift=DriftSpec(covariate=1.0)), 0)
    assert drifted["monthly_charges"].mean() > 1.3 * base["monthly_charges"].mean()


def test_concept_drift_changes_the_rule_not_the_inputs() -> None:
    base = generate_day(GeneratorSpec(seed=1, rows_per_day=5000), 0)
    drifted = generate_day(GeneratorSpec(seed=1, rows_per_day=5000, drift=DriftSpec(concept=1.0)), 0)
    assert np.allclose(base["support_tickets_30d"], drifted["support_tickets_30d"])
    rate = lambda df: (df.loc[df["support_tickets_30d"] >= 3, "churned"] == "yes").mean()  # noqa: E731
    assert rate(drifted) < rate(base)


def test_faults_only_from_the_given_day() -> None:
    spec = GeneratorSpec(seed=1, days=2, rows_per_day=400, drift_from_day=1,
                         faults=FaultSpec(missing={"monthly_charges": 0.5}, rename={"tenure_months": "tenure"},
                                          retype={"num_products": "string"}, out_of_range={"payment_delay_days": 0.1}))
    (_, clean), (_, bad) = generate(spec)
    assert "tenure_months" in clean.columns and "tenure" in bad.columns
    assert clean["monthly_charges"].isna().mean() == 0 and 0.4 < bad["monthly_charges"].isna().mean() < 0.6
    assert bad["num_products"].map(type).eq(str).all()
    assert (bad["payment_delay_days"] < 0).any() and not (clean["payment_delay_days"] < 0).any()


def test_fault_on_unknown_column_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown column 'nope'"):
        generate_day(GeneratorSpec(faults=FaultSpec(missing={"nope": 0.1}), rows_per_day=10), 0)
