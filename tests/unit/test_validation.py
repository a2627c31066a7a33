"""Data validation with real Great Expectations on small churn batches (with injected faults)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from flywheel.datagen import FaultSpec, apply_faults
from flywheel.errors import ConfigError, DataValidationError
from flywheel.schemas import DatasetDefinition
from flywheel.settings import ExtraExpectation, MissingValuesConfig, RowCountConfig, ValidateConfig
from flywheel.validation import build_suite, read_batch, validate_frame
from tasks.validate import artifact_key, publish_validation_table, validate_batch, validation_rows

pytestmark = pytest.mark.integration  # real Great Expectations


@pytest.fixture
def cfg(settings) -> ValidateConfig:
    return settings.validate_


@pytest.fixture
def batch(small_batches: list[pd.DataFrame]) -> pd.DataFrame:
    return small_batches[0]


def faulty(df: pd.DataFrame, **faults) -> pd.DataFrame:
    return apply_faults(df, FaultSpec(**faults), np.random.default_rng(0))


def by_expectation(outcome, name: str, column: str | None = None) -> list[dict]:
    return [f for f in outcome.failures if f["expectation"] == name and (column is None or f["column"] == column)]


def test_clean_batch_passes(batch: pd.DataFrame, dataset: DatasetDefinition, cfg: ValidateConfig):
    outcome = validate_frame(batch, dataset, cfg, "batch_2026-01-01.parquet")
    assert outcome.success, outcome.failures
    assert outcome.failures == [] and outcome.alerts == [] and outcome.imputed == []
    assert outcome.row_count == len(batch) == 300
    assert outcome.batch == "batch_2026-01-01.parquet"


def test_a_suite_reused_between_batches_follows_the_settings_and_the_definition(
        batch: pd.DataFrame, dataset: DatasetDefinition, cfg: ValidateConfig):
    """The suite is built once per (definition, settings) in a process: a change to either must still count,
    and a failing batch must not leave its failure on the next one."""
    tight = cfg.model_copy(update={"row_count": RowCountConfig(min=1, max=10)})
    assert by_expectation(validate_frame(batch, dataset, tight, "a"), "ExpectTableRowCountToBeBetween")
    assert validate_frame(batch, dataset, cfg, "b").success
    assert by_expectation(validate_frame(batch, dataset, tight, "c"), "ExpectTableRowCountToBeBetween")
    narrower = dataset.model_copy(update={"features": [
        f.model_copy(update={"max": 1}) if f.name == "tenure_months" else f for f in dataset.features]})
    assert by_expectation(validate_frame(batch, narrower, cfg, "d"), "ExpectColumnValuesToBeBetween", "tenure_months")
    assert validate_frame(batch, dataset, cfg, "e").success


def test_suite_checks_every_required_column_and_derives_rules(dataset: DatasetDefinition, cfg: ValidateConfig):
    suite = build_suite(dataset, cfg)
    kinds = [(type(e).__name__, getattr(e, "column", None)) for e in suite.expectations]
    exist = {c for k, c in kinds if k == "ExpectColumnToExist"}
    assert exist == set(dataset.required_columns)
    assert ("ExpectColumnValuesToBeBetween", "tenure_months") in kinds
    assert ("ExpectColumnValuesToBeInSet", "region") in kinds
    assert ("ExpectColumnValuesToBeOfType", "event_timestamp") in kinds
    assert ("ExpectTableRowCountToBeBetween", None) in kinds
    not_null = {c for k, c in kinds if k == "ExpectColumnValuesToNotBeNull"}
    assert {dataset.entity, dataset.timestamp, dataset.label, "tenure_months", "region"} <= not_null


def test_renamed_column_fails_as_missing_column(batch, dataset, cfg):
    outcome = validate_frame(faulty(batch, rename={"tenure_months": "tenure"}), dataset, cfg, "b")
    assert not outcome.success
    [failure] = outcome.failures  # reported once, not as range/type/null errors on a column that is gone
    assert failure["expectation"] == "ExpectColumnToExist"
    assert failure["column"] == "tenure_months"
    assert "tenure" in failure["detail"]


def test_numbers_turned_into_text_fail_the_type_check(batch, dataset, cfg):
    outcome = validate_frame(faulty(batch, retype={"monthly_charges": "string"}), dataset, cfg, "b")
    assert not outcome.success
    [failure] = outcome.failures
    assert failure["expectation"] == "ExpectColumnValuesToBeInTypeList"
    assert failure["column"] == "monthly_charges"
    assert failure["unexpected_count"] == 300 and failure["unexpected_percent"] == 100.0
    assert all(isinstance(v, str) for v in failure["sample_values"])


def test_numbers_in_a_category_column_fail_the_type_check(batch, dataset, cfg):
    df = batch.copy()
    df["contract_type"] = df["contract_type"].astype(object)
    df.loc[:9, "contract_type"] = 7
    outcome = validate_frame(df, dataset, cfg, "b")
    types = by_expectation(outcome, "ExpectColumnValuesToBeInTypeList", "contract_type")
    assert types and types[0]["unexpected_count"] == 10 and types[0]["sample_values"][0] == 7


def test_naive_timestamps_fail_the_timestamp_type(batch, dataset, cfg):
    df = batch.copy()
    df["event_timestamp"] = df["event_timestamp"].dt.tz_localize(None)
    outcome = validate_frame(df, dataset, cfg, "b")
    [failure] = outcome.failures
    assert failure["expectation"] == "ExpectColumnValuesToBeOfType"
    assert failure["column"] == "event_timestamp"
    assert failure["observed_value"] == "datetime64"


def test_out_of_range_values_fail_with_counts_and_samples(batch, dataset, settings):
    cfg = settings.validate_.model_copy(update={"sample_values": 3})
    df = faulty(batch, out_of_range={"support_tickets_30d": 0.1})
    expected = int((df["support_tickets_30d"] == -999.0).sum())
    outcome = validate_frame(df, dataset, cfg, "b")
    [failure] = outcome.failures
    assert failure["expectation"] == "ExpectColumnValuesToBeBetween"
    assert failure["column"] == "support_tickets_30d"
    assert failure["unexpected_count"] == expected > 0
    assert failure["unexpected_percent"] == pytest.approx(100 * expected / 300, abs=1e-3)
    assert failure["sample_values"] == [-999.0] * 3


def test_unknown_category_fails_the_domain(batch, dataset, cfg):
    df = batch.copy()
    df.loc[:4, "region"] = "atlantis"
    [failure] = validate_frame(df, dataset, cfg, "b").failures
    assert failure["expectation"] == "ExpectColumnValuesToBeInSet"
    assert failure["unexpected_count"] == 5 and "atlantis" in failure["sample_values"]


def test_missing_share_over_threshold_fails_by_default(batch, dataset, cfg):
    df = faulty(batch, missing={"avg_session_minutes": 0.5})
    share = df["avg_session_minutes"].isna().mean()
    assert share > cfg.missing.max_share
    outcome = validate_frame(df, dataset, cfg, "b")
    assert not outcome.success
    [failure] = outcome.failures
    assert failure["expectation"] == "ExpectColumnValuesToNotBeNull"
    assert failure["column"] == "avg_session_minutes"
    assert failure["missing_share"] == pytest.approx(share, abs=1e-6)
    assert failure["threshold"] == cfg.missing.max_share
    assert outcome.alerts == [
        {"column": "avg_session_minutes", "missing_share": pytest.approx(share, abs=1e-6), "threshold": 0.3}
    ]
    assert outcome.imputed == []


def test_missing_share_over_threshold_passes_imputed_when_allowed(batch, dataset, cfg):
    cfg = cfg.model_copy(update={"missing": MissingValuesConfig(max_share=0.3, impute_excess=True)})
    df = faulty(batch, missing={"avg_session_minutes": 0.5, "payment_method": 0.6})
    outcome = validate_frame(df, dataset, cfg, "b")
    assert outcome.success, outcome.failures
    assert sorted(outcome.imputed) == ["avg_session_minutes", "payment_method"]
    assert {a["column"] for a in outcome.alerts} == {"avg_session_minutes", "payment_method"}
    assert "imputed" in outcome.summary_markdown()


def test_missing_values_under_threshold_raise_nothing(batch, dataset, cfg):
    outcome = validate_frame(faulty(batch, missing={"monthly_charges": 0.1}), dataset, cfg, "b")
    assert outcome.success and outcome.alerts == []


def test_non_nullable_feature_with_any_null_fails(batch, dataset, cfg):
    df = batch.copy()
    df.loc[:2, "tenure_months"] = None
    [failure] = validate_frame(df, dataset, cfg, "b").failures
    assert failure["expectation"] == "ExpectColumnValuesToNotBeNull"
    assert failure["column"] == "tenure_months" and failure["unexpected_count"] == 3


@pytest.mark.parametrize(("bounds", "passes"), [((1, 300), True), ((301, 1000), False), ((1, 299), False)])
def test_row_count_bounds(batch, dataset, cfg, bounds, passes):
    cfg = cfg.model_copy(update={"row_count": RowCountConfig(min=bounds[0], max=bounds[1])})
    outcome = validate_frame(batch, dataset, cfg, "b")
    assert outcome.success is passes
    if not passes:
        assert outcome.failures == [
            {"expectation": "ExpectTableRowCountToBeBetween", "column": None, "observed_value": 300}
        ]


def test_extra_expectation_from_config(batch, dataset, cfg):
    extra = [ExtraExpectation(type="ExpectColumnValuesToBeUnique", kwargs={"column": "customer_id"})]
    cfg = cfg.model_copy(update={"extra_expectations": extra})
    assert batch["customer_id"].is_unique
    assert validate_frame(batch, dataset, cfg, "b").success
    dup = pd.concat([batch, batch.head(2)], ignore_index=True)
    [failure] = validate_frame(dup, dataset, cfg, "b").failures
    assert failure["expectation"] == "ExpectColumnValuesToBeUnique" and failure["unexpected_count"] == 4


def test_unknown_extra_expectation_is_a_config_error(dataset, cfg):
    extra = [ExtraExpectation(type="ExpectColumnToBeAwesome", kwargs={"column": "customer_id"})]
    with pytest.raises(ConfigError, match="ExpectColumnToBeAwesome") as err:
        build_suite(dataset, cfg.model_copy(update={"extra_expectations": extra}))
    assert "validate.extra_expectations[0].type" in str(err.value)


def test_extra_expectation_with_bad_arguments_is_a_config_error(dataset, cfg):
    extra = [ExtraExpectation(type="ExpectColumnValuesToBeBetween", kwargs={"colum": "x", "min_value": "a"})]
    with pytest.raises(ConfigError, match=r"validate\.extra_expectations\[0\]\.kwargs.*ExpectColumnValuesToBeBetween"):
        build_suite(dataset, cfg.model_copy(update={"extra_expectations": extra}))


def test_csv_batch_reads_and_validates(tmp_path: Path, batch, dataset, cfg):
    path = tmp_path / "batch_2026-01-01.csv"
    batch.to_csv(path, index=False)
    df = read_batch(path, dataset)
    assert str(df["event_timestamp"].dtype) == "datetime64[ns, UTC]"
    outcome = validate_frame(df, dataset, cfg, path.name)
    assert outcome.success, outcome.failures


def test_task_passes_clean_batch_and_leaves_it(tmp_path: Path, batch, dataset, cfg):
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    path = incoming / "batch_2026-01-01.parquet"
    batch.to_parquet(path, index=False)
    outcome = validate_batch.fn(path, dataset, cfg, tmp_path / "quarantine")
    assert outcome.success and path.exists()
    assert not (tmp_path / "quarantine").exists() or not any((tmp_path / "quarantine").iterdir())


def test_task_quarantines_failed_batch_and_raises(tmp_path: Path, batch, dataset, cfg, caplog):
    incoming, quarantine = tmp_path / "incoming", tmp_path / "quarantine"
    incoming.mkdir()
    path = incoming / "batch_2026-01-02.parquet"
    faulty(batch, rename={"tenure_months": "tenure"}, missing={"avg_session_minutes": 0.5}).to_parquet(path)
    with caplog.at_level(logging.WARNING), pytest.raises(DataValidationError) as err:
        validate_batch.fn(path, dataset, cfg, quarantine)
    message = str(err.value)
    assert "ExpectColumnToExist(tenure_months)" in message
    assert "ExpectColumnValuesToNotBeNull(avg_session_minutes)" in message
    assert err.value.quarantined_to == str(quarantine / path.name)
    assert list(incoming.iterdir()) == []
    assert (quarantine / path.name).is_file()
    assert (quarantine / f"{path.name}.validation.json").is_file()
    assert any("avg_session_minutes" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)


def test_task_quarantines_unreadable_file(tmp_path: Path, dataset, cfg):
    path = tmp_path / "batch_2026-01-03.parquet"
    path.write_bytes(b"not a parquet file")
    with pytest.raises(DataValidationError, match="ReadBatch"):
        validate_batch.fn(path, dataset, cfg, tmp_path / "q")
    assert not path.exists() and (tmp_path / "q" / path.name).read_bytes() == b"not a parquet file"


def test_artifact_key_is_valid_for_prefect(dataset):
    assert artifact_key(dataset) == "validation-churn"
    assert artifact_key(dataset.model_copy(update={"name": "web_churn_v2"})) == "validation-web-churn-v2"


def test_failures_use_the_class_name_even_with_acronyms(batch, dataset, cfg):
    # snake-case result type "expect_column_kl_divergence..." must map back to the class name, not "Kl"
    kwargs = {"column": "region", "partition_object": {"values": ["north", "south"], "weights": [0.5, 0.5]},
              "threshold": 0.01}  # fmt: skip
    extra = [ExtraExpectation(type="ExpectColumnKLDivergenceToBeLessThan", kwargs=kwargs)]
    [failure] = validate_frame(batch, dataset, cfg.model_copy(update={"extra_expectations": extra}), "b").failures
    assert failure["expectation"] == "ExpectColumnKLDivergenceToBeLessThan"
    assert failure["column"] == "region"


def test_parallel_validations_do_not_interfere(small_batches, dataset, cfg):
    # Prefect's default task runner is a thread pool: each validation has its own ephemeral context
    from concurrent.futures import ThreadPoolExecutor

    frames = [
        small_batches[1],
        faulty(small_batches[2], rename={"tenure_months": "t"}),
        faulty(small_batches[3], out_of_range={"num_products": 0.2}),
        faulty(small_batches[4], retype={"monthly_charges": "string"}),
    ]

    def failed(df: pd.DataFrame) -> list[tuple[str, str]]:
        return [(f["expectation"], f["column"]) for f in validate_frame(df, dataset, cfg, "b").failures]

    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(failed, frames))
    assert got == [
        [],
        [("ExpectColumnToExist", "tenure_months")],
        [("ExpectColumnValuesToBeBetween", "num_products")],
        [("ExpectColumnValuesToBeInTypeList", "monthly_charges")],
    ]


def test_a_runs_batches_are_one_table_row_each(dataset):
    from flywheel.validation import ValidationOutcome

    outcomes = [ValidationOutcome(batch="batch_2026-01-01.parquet", success=True, row_count=500),
                ValidationOutcome(batch="batch_2026-01-02.parquet", success=True, row_count=480, imputed=["tenure"],
                                  alerts=[{"column": "tenure", "missing_share": 0.4, "threshold": 0.3}])]
    rows = validation_rows(outcomes)
    assert [r["batch"] for r in rows] == ["batch_2026-01-01.parquet", "batch_2026-01-02.parquet"]
    assert rows[0] == {"batch": "batch_2026-01-01.parquet", "result": "passed", "rows": 500,
                       "failed expectations": 0, "data-quality alerts": "-", "imputed": "-"}
    assert rows[1]["data-quality alerts"] == "tenure 40.0% missing" and rows[1]["imputed"] == "tenure"
    publish_validation_table.fn(outcomes, dataset)  # outside a run: nothing to attach to, no server started
