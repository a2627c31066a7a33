"""Data quality of a window: counts against the profile, and the dataset's Great Expectations suite.

Its verdict is its own: a broken feed (a renamed column, a unit change pushing values out of range, a
burst of nulls) is a data-quality alarm for someone to fix, never a reason to retrain on that data. The
window verdict exposes it apart from drift (alarms.py), and the trigger layer must keep it apart.

Counts per feature, from the profile alone:
- missing share in the window vs the reference's; a problem when it grew by more than `max_missing_increase`;
- numeric: values outside the dataset's declared min/max (a problem above `max_out_of_range_share` of the
  window's rows), and values outside the reference's observed min/max (shown, never a problem by itself:
  new extremes are normal);
- categorical: values of categories the reference never had (a problem above `max_new_category_share`).
The Great Expectations suite is the one `flywheel/validation.py` derives from the dataset definition and
runs on every training batch. A serving window carries features, not labels: failures that only say a
non-feature column (label, label time, arrival time, slice columns) is absent are dropped, and so is the
row-count expectation (a window's volume is judged by `alarm.min_rows`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict

from flywheel.monitoring.config import QualitySettings
from flywheel.monitoring.profile import (
    CategoricalSummary,
    MonitoringError,
    NumericSummary,
    ReferenceProfile,
    category_values,
    numeric_values,
)
from flywheel.schemas import DatasetDefinition
from flywheel.settings import ValidateConfig

NOT_SERVING_EXPECTATIONS = frozenset({"ExpectTableRowCountToBeBetween"})
SAMPLE_CATEGORIES = 5


class FeatureQuality(BaseModel):
    model_config = ConfigDict(frozen=True)

    column: str
    present: bool
    numeric_ok: bool = True  # False: a numeric feature arrived as something else
    missing_share: float | None = None
    reference_missing_share: float
    out_of_range: int = 0  # outside the dataset's declared min/max
    outside_reference: int = 0  # outside the reference's observed min/max (information)
    new_categories: list[str] = []  # up to SAMPLE_CATEGORIES examples
    new_category_share: float = 0.0
    problems: list[str] = []


class QualityResult(BaseModel):
    model_config = ConfigDict(frozen=True)

    rows: int
    features: list[FeatureQuality]
    expectations_run: bool = False
    expectation_failures: list[dict[str, Any]] = []  # as flywheel.validation reports them

    @property
    def problems(self) -> list[str]:
        out = [p for f in self.features for p in f.problems]
        absent = {f.column for f in self.features if not f.present}  # already said once above
        for f in self.expectation_failures:
            if f["expectation"] == "ExpectColumnToExist" and f.get("column") in absent:
                continue
            what = f"{f['expectation']}({f.get('column') or ''})"
            detail = (f"{f['unexpected_count']} unexpected ({f['unexpected_percent']:.2f}%)"
                      if "unexpected_count" in f else f"observed {f.get('observed_value')}")
            out.append(f"Great Expectations {what}: {f.get('detail') or detail}")
        return out

    @property
    def passed(self) -> bool:
        return not self.problems

    def feature(self, name: str) -> FeatureQuality:
        return next(f for f in self.features if f.column == name)


def _numeric_quality(name: str, s: NumericSummary, column: pd.Series, rows: int, cfg: QualitySettings
                     ) -> FeatureQuality:
    try:
        v = numeric_values(column, f"window column {name!r}")
    except MonitoringError:
        return FeatureQuality(column=name, present=True, numeric_ok=False, reference_missing_share=s.missing_share,
                              problems=[f"{name}: not numeric in the window (numeric in the reference)"])
    present = v[~np.isnan(v)]
    missing = 1 - len(present) / rows if rows else 0.0
    lo = -np.inf if s.declared_min is None else s.declared_min
    hi = np.inf if s.declared_max is None else s.declared_max
    out_of_range = int(np.count_nonzero((present < lo) | (present > hi)))
    outside = int(np.count_nonzero((present < s.min) | (present > s.max))) if s.count else 0
    problems = _missing_problem(name, missing, s.missing_share, cfg)
    if rows and out_of_range / rows > cfg.max_out_of_range_share:
        problems.append(f"{name}: {out_of_range} value(s) ({out_of_range / rows:.2%}) outside the dataset's range "
                        f"[{s.declared_min}, {s.declared_max}]")
    return FeatureQuality(column=name, present=True, missing_share=missing, reference_missing_share=s.missing_share,
                          out_of_range=out_of_range, outside_reference=outside, problems=problems)


def _categorical_quality(name: str, s: CategoricalSummary, column: pd.Series, rows: int, cfg: QualitySettings
                         ) -> FeatureQuality:
    values = category_values(column)
    missing = 1 - len(values) / rows if rows else 0.0
    counts = values.value_counts()
    new = counts[~counts.index.isin(list(s.categories))] if not s.other else counts.iloc[:0]
    new_share = float(new.sum() / rows) if rows else 0.0
    problems = _missing_problem(name, missing, s.missing_share, cfg)
    if new_share > cfg.max_new_category_share:
        problems.append(f"{name}: {int(new.sum())} value(s) ({new_share:.2%}) of categories the reference lacks, "
                        f"e.g. {list(new.index[:SAMPLE_CATEGORIES])}")
    return FeatureQuality(column=name, present=True, missing_share=missing, reference_missing_share=s.missing_share,
                          new_categories=[str(k) for k in new.index[:SAMPLE_CATEGORIES]], new_category_share=new_share,
                          problems=problems)


def _missing_problem(name: str, missing: float, reference: float, cfg: QualitySettings) -> list[str]:
    if missing - reference > cfg.max_missing_increase:
        return [f"{name}: {missing:.2%} missing (reference {reference:.2%}; more than "
                f"{cfg.max_missing_increase:.0%} above it)"]
    return []


def profile_quality(profile: ReferenceProfile, window: pd.DataFrame, cfg: QualitySettings) -> QualityResult:
    """The per-feature data-quality counts of `window` against the profile (no Great Expectations)."""
    rows = len(window)
    features = []
    for name, s in profile.features.items():
        if name not in window.columns:
            features.append(FeatureQuality(column=name, present=False, reference_missing_share=s.missing_share,
                                           problems=[f"{name}: column missing from the window"]))
        elif isinstance(s, NumericSummary):
            features.append(_numeric_quality(name, s, window[name], rows, cfg))
        else:
            features.append(_categorical_quality(name, s, window[name], rows, cfg))
    return QualityResult(rows=rows, features=features)


def expectation_failures(window: pd.DataFrame, dataset: DatasetDefinition, cfg: ValidateConfig,
                         name: str = "window") -> list[dict[str, Any]]:
    """Failures of the dataset's Great Expectations suite on a serving window (see the module docstring
    for the two kinds dropped). Imports Great Expectations (about 3 s the first time)."""
    from flywheel.validation import validate_frame

    outcome = validate_frame(window, dataset, cfg, name)
    features = set(dataset.feature_names)
    return [
        f for f in outcome.failures
        if f["expectation"] not in NOT_SERVING_EXPECTATIONS
        and not (f["expectation"] == "ExpectColumnToExist" and f.get("column") not in features)
    ]  # fmt: skip


def with_expectations(result: QualityResult, failures: list[dict[str, Any]]) -> QualityResult:
    return result.model_copy(update={"expectations_run": True, "expectation_failures": failures})
