"""Data validation: a Great Expectations suite derived from the dataset definition, run on one batch.

Great Expectations is imported inside the functions that need it (3-8 s import): reading a batch,
building the outcome and quarantining a file stay cheap to import for the CLI and the flows.
Each validation uses its own ephemeral GX context (about 15 ms); the suite, built once per definition and
settings in a process, is only read by GX (it hands each validator fresh expectation configurations), so
concurrent task runs share nothing they write.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict

from flywheel.errors import ConfigError
from flywheel.schemas import DatasetDefinition
from flywheel.settings import ValidateConfig

if TYPE_CHECKING:
    from great_expectations import ExpectationSuite
    from great_expectations.core import ExpectationValidationResult

log = logging.getLogger(__name__)

# Pandas dtypes (and, for object columns, Python value types) accepted per logical type.
NUMERIC_TYPES = [
    "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
    "float16", "float32", "float64", "bool",
    "Int8Dtype", "Int16Dtype", "Int32Dtype", "Int64Dtype", "UInt8Dtype", "UInt16Dtype", "UInt32Dtype",
    "UInt64Dtype", "Float32Dtype", "Float64Dtype", "BooleanDtype",
    "int", "float",
]  # fmt: skip
INTEGER_TYPES = [
    "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
    "Int8Dtype", "Int16Dtype", "Int32Dtype", "Int64Dtype", "UInt8Dtype", "UInt16Dtype", "UInt32Dtype",
    "UInt64Dtype", "int",
]  # fmt: skip
STRING_TYPES = ["str", "StringDtype"]
# tz-aware datetime columns have dtype.type == pd.Timestamp; ExpectColumnValuesToBeOfType compares
# exactly that (ExpectColumnValuesToBeInTypeList cannot match a tz-aware dtype at all in GX 1.24).
TIMESTAMP_TYPE = "Timestamp"

MISSING_SHARE_CHECK = "missing_share"  # marks the not-null expectation that carries the missing threshold
_TYPE_CHECKS = {"ExpectColumnValuesToBeInTypeList", "ExpectColumnValuesToBeOfType"}


# ------------------------------------------------------------------------------------ reading


def read_batch(
    path: Path, dataset: DatasetDefinition, fmt: Literal["parquet", "csv"] | None = None
) -> pd.DataFrame:
    """Read one batch file: `read_batch(path, dataset)`.

    The format is `fmt` if given, else the file suffix (.csv / .parquet / .pq), else `dataset.format`.
    CSV: the dataset's timestamp columns are parsed as tz-aware UTC (a column that does not parse is
    left as text so the type expectation reports it), and a string entity stays text ("007" is not 7).
    Parquet is read as written: naive timestamps stay naive and fail the type check (the contract is UTC).
    """
    path = Path(path)
    if fmt is None:
        suffix = path.suffix.lower()
        fmt = "csv" if suffix == ".csv" else "parquet" if suffix in (".parquet", ".pq") else dataset.format
    if fmt == "parquet":
        return pd.read_parquet(path)
    if fmt != "csv":
        raise ValueError(f"format must be parquet or csv, got {fmt!r}")
    dtype = {dataset.entity: str} if dataset.entity_type == "string" else None
    df = pd.read_csv(path, dtype=dtype)
    for col in _timestamp_columns(dataset):
        if col in df.columns:
            try:
                df[col] = pd.to_datetime(df[col], utc=True, format="ISO8601")
            except (ValueError, TypeError) as exc:
                log.warning("column %s of %s does not parse as timestamps: %s", col, path.name, exc)
    return df


def _timestamp_columns(dataset: DatasetDefinition) -> list[str]:
    return [c for c in (dataset.timestamp, dataset.created_timestamp, dataset.label_timestamp) if c]


# ------------------------------------------------------------------------------------ outcome


class ValidationOutcome(BaseModel):
    """What one batch's validation found. `failures` make the batch fail; `alerts` do not by themselves."""

    model_config = ConfigDict(frozen=True)

    batch: str
    success: bool
    row_count: int
    # {expectation, column, observed_value} or {expectation, column, unexpected_count,
    #  unexpected_percent (0-100), sample_values}; missing-share failures add missing_share, threshold
    failures: list[dict[str, Any]] = []
    alerts: list[dict[str, Any]] = []  # {column, missing_share, threshold}
    imputed: list[str] = []  # features over the missing threshold, imputed downstream (impute_excess)

    @property
    def failed_expectations(self) -> list[str]:
        return [f"{f['expectation']}({f.get('column') or ''})" for f in self.failures]

    def summary_markdown(self) -> str:
        """A readable report for a Prefect artifact."""
        status = "PASSED" if self.success else "FAILED"
        lines = [
            f"## Validation of `{self.batch}`: **{status}**",
            "",
            f"Rows: {self.row_count} | failed expectations: {len(self.failures)} | "
            f"data-quality alerts: {len(self.alerts)} | imputed: {', '.join(self.imputed) or 'none'}",
            "",
        ]
        if self.failures:
            lines += [
                "### Failed expectations",
                "",
                "| Expectation | Column | Observed | Unexpected | Sample values |",
                "|---|---|---|---|---|",
            ]
            for f in self.failures:
                observed = f.get("observed_value", "")
                if "threshold" in f:
                    observed = f"missing share {f['missing_share']:.2%} > {f['threshold']:.2%}"
                unexpected = (
                    f"{f['unexpected_count']} ({f['unexpected_percent']:.2f}%)" if "unexpected_count" in f else ""
                )
                if f.get("error"):
                    observed = f"error: {f['error']}"
                samples = ", ".join(repr(v) for v in f.get("sample_values", []))
                lines.append(
                    f"| {f['expectation']} | {_md(f.get('column') or '')} | {_md(observed)} "
                    f"| {unexpected} | {_md(samples)} |"
                )
            lines.append("")
        if self.alerts:
            lines += [
                "### Data-quality alerts (missing values over the threshold)",
                "",
                "| Column | Missing share | Threshold | Action |",
                "|---|---|---|---|",
            ]
            for a in self.alerts:
                action = "imputed" if a["column"] in self.imputed else "batch fails"
                lines.append(f"| {_md(a['column'])} | {a['missing_share']:.2%} | {a['threshold']:.2%} | {action} |")
            lines.append("")
        return "\n".join(lines)


def _md(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


# ------------------------------------------------------------------------------------ suite


def build_suite(dataset: DatasetDefinition, cfg: ValidateConfig) -> ExpectationSuite:
    """The expectation suite for one batch of `dataset`, derived from its definition and `cfg`.

    Raises ConfigError naming an unknown (or mis-configured) extra expectation.
    """
    import great_expectations as gx
    import great_expectations.expectations as gxe

    expectations: list[gxe.Expectation] = []
    # collected first: ExpectationSuite.add_expectation needs an active data context, the constructor does not
    add = expectations.append
    # every required column exists, so a renamed column fails as such (not as a cryptic metric error)
    for col in dataset.required_columns:
        add(gxe.ExpectColumnToExist(column=col))

    entity_types = INTEGER_TYPES if dataset.entity_type == "int" else STRING_TYPES
    add(gxe.ExpectColumnValuesToBeInTypeList(column=dataset.entity, type_list=entity_types))
    add(gxe.ExpectColumnValuesToNotBeNull(column=dataset.entity))
    for col in _timestamp_columns(dataset):
        add(gxe.ExpectColumnValuesToBeOfType(column=col, type_=TIMESTAMP_TYPE))
    add(gxe.ExpectColumnValuesToNotBeNull(column=dataset.timestamp))
    add(gxe.ExpectColumnValuesToNotBeNull(column=dataset.label))

    max_share = cfg.missing.max_share
    for f in dataset.features:
        add(gxe.ExpectColumnValuesToBeInTypeList(
            column=f.name, type_list=NUMERIC_TYPES if f.is_numeric else STRING_TYPES
        ))  # fmt: skip
        if f.min is not None or f.max is not None:
            add(gxe.ExpectColumnValuesToBeBetween(column=f.name, min_value=f.min, max_value=f.max))
        if f.allowed is not None:
            add(gxe.ExpectColumnValuesToBeInSet(column=f.name, value_set=list(f.allowed)))
        if not f.nullable:
            add(gxe.ExpectColumnValuesToNotBeNull(column=f.name))
        elif max_share < 1.0:
            # always in the suite; with impute_excess its failure becomes an alert + imputation instead
            add(gxe.ExpectColumnValuesToNotBeNull(
                column=f.name, mostly=1.0 - max_share,
                meta={"flywheel": MISSING_SHARE_CHECK, "threshold": max_share},
            ))  # fmt: skip

    add(gxe.ExpectTableRowCountToBeBetween(min_value=cfg.row_count.min, max_value=cfg.row_count.max))

    for i, extra in enumerate(cfg.extra_expectations):
        key = f"validate.extra_expectations[{i}]"
        cls = getattr(gxe, extra.type, None)
        if not (isinstance(cls, type) and issubclass(cls, gxe.Expectation)):
            raise ConfigError([("settings", f"{key}.type", f"unknown Great Expectations expectation "
                                f"{extra.type!r} (use a class name such as ExpectColumnValuesToBeUnique)")])
        try:
            add(cls(**extra.kwargs))
        except Exception as exc:  # GX raises pydantic errors of its own vendored flavour
            raise ConfigError([("settings", f"{key}.kwargs", f"invalid arguments for {extra.type}: {exc}")]) from None
    return gx.ExpectationSuite(name=f"{dataset.name}-batch", expectations=expectations)


@functools.lru_cache(maxsize=8)
def _suite_for(dataset_json: str, cfg_json: str) -> ExpectationSuite:
    """`build_suite`, built once per definition and settings in a process: a run validates one batch after another
    against the same suite, and building it (GX's pydantic models) cost about a third of each batch's validation.
    Keyed by the models' JSON, so any change to either builds a new one; validating does not modify a suite."""
    dataset, cfg = DatasetDefinition.model_validate_json(dataset_json), ValidateConfig.model_validate_json(cfg_json)
    return build_suite(dataset, cfg)


# ------------------------------------------------------------------------------------ validation


def validate_frame(
    df: pd.DataFrame, dataset: DatasetDefinition, cfg: ValidateConfig, batch_name: str
) -> ValidationOutcome:
    """Validate one batch in memory (no file I/O) against `build_suite(dataset, cfg)`."""
    suite = _suite_for(dataset.model_dump_json(), cfg.model_dump_json())
    results = _run_suite(df, suite, cfg.sample_values)
    # results carry the snake-case type; report the class name people write in configs
    class_names = {e.expectation_type: type(e).__name__ for e in suite.expectations}

    columns = set(df.columns)
    required = set(dataset.required_columns)
    features = set(dataset.feature_names)
    max_share = cfg.missing.max_share
    failures: list[dict[str, Any]] = []
    alerts: list[dict[str, Any]] = []
    imputed: list[str] = []
    type_failed: set[str] = set()

    for r in results:
        conf = r.expectation_config
        name = class_names.get(conf.type) or _class_name(conf.type)
        column = conf.kwargs.get("column")
        res = dict(r.result or {})
        meta = conf.meta or {}

        if name == "ExpectColumnValuesToNotBeNull" and column in features and "element_count" in res:
            share = res["unexpected_count"] / res["element_count"] if res["element_count"] else 0.0
            over = not r.success if meta.get("flywheel") == MISSING_SHARE_CHECK else share > max_share
            if over:
                alerts.append({"column": column, "missing_share": round(share, 6), "threshold": max_share})
            if meta.get("flywheel") == MISSING_SHARE_CHECK and not r.success:
                if cfg.missing.impute_excess:
                    imputed.append(column)
                else:
                    failures.append({
                        "expectation": name, "column": column, "observed_value": round(share, 6),
                        "missing_share": round(share, 6), "threshold": max_share,
                        "unexpected_count": int(res["unexpected_count"]),
                        "unexpected_percent": round(float(res.get("unexpected_percent") or 0.0), 4),
                    })  # fmt: skip
                continue
        if r.success:
            continue
        # a missing required column is reported once, by ExpectColumnToExist
        if column and column not in columns and column in required and name != "ExpectColumnToExist":
            continue
        failure: dict[str, Any] = {"expectation": name, "column": column}
        if "unexpected_count" in res:
            failure["unexpected_count"] = int(res["unexpected_count"])
            failure["unexpected_percent"] = round(float(res.get("unexpected_percent") or 0.0), 4)
            failure["sample_values"] = [_jsonable(v) for v in (res.get("partial_unexpected_list") or [])][
                : cfg.sample_values
            ]
        else:
            failure["observed_value"] = _jsonable(res.get("observed_value"))
        info = r.exception_info or {}
        if info.get("raised_exception") or any(
            isinstance(v, dict) and v.get("raised_exception") for v in info.values()
        ):
            failure["error"] = _exception_message(info)
        if name == "ExpectColumnToExist":
            extra_cols = sorted(columns - required)
            failure["observed_value"] = None
            failure["detail"] = f"column {column!r} not in batch; unexpected columns: {extra_cols}"
        if name in _TYPE_CHECKS and column:
            type_failed.add(column)
        failures.append(failure)

    # a column of the wrong type makes range/set checks raise: its type failure says it all
    failures = [
        f for f in failures
        if not (f.get("error") and f["column"] in type_failed and f["expectation"] not in _TYPE_CHECKS)
    ]  # fmt: skip
    return ValidationOutcome(
        batch=batch_name, success=not failures, row_count=len(df), failures=failures, alerts=alerts, imputed=imputed
    )


def _run_suite(df: pd.DataFrame, suite: ExpectationSuite, sample_values: int) -> list[ExpectationValidationResult]:
    import great_expectations as gx
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    project = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),  # no Data Docs
        # GX prints tqdm "Calculating Metrics" bars to stderr by default: noise in CLI and flow logs
        progress_bars=ProgressBarsConfig(globally=False, metric_calculations=False),
    )
    context = gx.get_context(mode="ephemeral", project_config=project)
    batch_definition = (
        context.data_sources.add_pandas("flywheel")
        .add_dataframe_asset("batch")
        .add_batch_definition_whole_dataframe("whole")
    )
    batch = batch_definition.get_batch(batch_parameters={"dataframe": df})
    # Pass 1 computes only success flags (SUMMARY's unexpected-index bookkeeping copies the frame once
    # per row-level expectation, 3-5x slower on 100k rows); pass 2 re-runs only the failures for details.
    first = list(batch.validate(suite, result_format="BOOLEAN_ONLY").results)
    failed = [r.expectation_config for r in first if not r.success]
    if not failed:
        return first
    detail_suite = gx.ExpectationSuite(
        name=f"{suite.name}-failures", expectations=[c.to_domain_obj() for c in failed]
    )
    detailed = batch.validate(
        detail_suite,
        result_format={"result_format": "SUMMARY", "partial_unexpected_count": max(sample_values, 1)},
    ).results
    return [r for r in first if r.success] + list(detailed)


def _class_name(snake: str) -> str:
    """'expect_column_to_exist' -> 'ExpectColumnToExist' (result configs carry the snake-case type)."""
    return "".join(part.capitalize() for part in snake.split("_"))


def _exception_message(info: dict[str, Any]) -> str:
    if info.get("exception_message"):
        return str(info["exception_message"])
    for v in info.values():
        if isinstance(v, dict) and v.get("exception_message"):
            return str(v["exception_message"])
    return "expectation raised an exception"


def _jsonable(value: Any) -> Any:
    """Sample and observed values as plain JSON values (numpy scalars, NaN, timestamps)."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return None if math.isnan(value) or math.isinf(value) else value
    if isinstance(value, pd.Timestamp | datetime):
        return None if pd.isna(value) else value.isoformat()
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return str(value)


# ------------------------------------------------------------------------------------ quarantine


def quarantine_batch(path: Path, quarantine_dir: Path, outcome: ValidationOutcome) -> Path:
    """Move a failed batch into `quarantine_dir` (never delete, never overwrite) with its report.

    A name already taken gets a `__<n>` suffix before the extension; the report is written beside the
    file as `<new name>.validation.json`. Returns the file's new path.
    """
    path = Path(path)
    quarantine_dir = Path(quarantine_dir)
    quarantine_dir.mkdir(parents=True, exist_ok=True)
    target = quarantine_dir / path.name
    n = 0
    while target.exists() or _report_path(target).exists():
        n += 1
        target = quarantine_dir / f"{path.stem}__{n}{path.suffix}"
    shutil.move(str(path), str(target))
    report = {
        "source": str(path),
        "quarantined_to": str(target),
        "quarantined_at": datetime.now(UTC).isoformat(),  # wall: a report for people, nothing compares it
        **outcome.model_dump(mode="json"),
    }
    tmp = _report_path(target).with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2, default=str))
    tmp.replace(_report_path(target))
    return target


def _report_path(target: Path) -> Path:
    return target.with_name(target.name + ".validation.json")
