"""The monitoring policy (`configs/monitoring.yaml`, found through `monitor.policy_file` in the settings).

`defaults` apply to every dataset; `datasets.<name>` lays a dataset's own choices over them (key features
and per-column methods name that dataset's columns, so a dataset brought by YAML alone gets the defaults
and nothing that names another dataset's columns). Strict: an unknown key, a method that does not
exist or a threshold out of range fails at load, naming the file and the key.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from flywheel.errors import ConfigError
from flywheel.trigger_policy import Duration

# Evidently 0.7's names for its tests; "auto" is its default choice per column (see drift.py)
Method = Literal["auto", "wasserstein", "jensenshannon", "psi", "ks", "chisquare", "z"]
P_VALUE_METHODS = frozenset({"ks", "chisquare", "z"})  # the score is a p-value: drift when it is small
DEFAULT_THRESHOLDS: dict[str, float] = {
    "wasserstein": 0.1,
    "jensenshannon": 0.1,
    "psi": 0.1,
    "ks": 0.05,
    "chisquare": 0.05,
    "z": 0.05,
}
NUMERIC_ONLY = frozenset({"wasserstein", "ks"})
CATEGORICAL_ONLY = frozenset({"chisquare", "z"})


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ColumnMethod(Strict):
    """How one column (or the model's prediction) is compared with its reference."""

    method: Method = "auto"
    threshold: float | None = Field(None, gt=0, description="None: the method's default (DEFAULT_THRESHOLDS)")

    @model_validator(mode="after")
    def _p_value_threshold_is_a_probability(self) -> ColumnMethod:
        if self.method in P_VALUE_METHODS and self.threshold is not None and self.threshold >= 1:
            raise ValueError(f"{self.method} compares a p-value: its threshold must be below 1, got {self.threshold}")
        return self


class DriftSettings(Strict):
    numeric: ColumnMethod = ColumnMethod()  # every numeric feature without a per-column entry
    categorical: ColumnMethod = ColumnMethod()
    columns: dict[str, ColumnMethod] = {}  # feature name -> its own method / threshold
    prediction: ColumnMethod = ColumnMethod()  # the model's P(positive) vs its training distribution
    psi_bins: int = Field(10, ge=2, le=50, description="quantile bins of the reference for method psi")

    @model_validator(mode="after")
    def _types_fit(self) -> DriftSettings:
        if self.numeric.method in CATEGORICAL_ONLY:
            raise ValueError(f"numeric.method {self.numeric.method!r} applies to categorical columns only")
        if self.categorical.method in NUMERIC_ONLY:
            raise ValueError(f"categorical.method {self.categorical.method!r} applies to numeric columns only")
        if self.prediction.method in CATEGORICAL_ONLY:
            raise ValueError(f"prediction.method {self.prediction.method!r} applies to categorical columns only")
        if 1000 % self.psi_bins:
            raise ValueError(f"psi_bins must divide 1000 (the profile's quantile grid), got {self.psi_bins}")
        return self


class AlarmSettings(Strict):
    """When a judged window raises the drift alarm (flywheel/monitoring/alarms.py)."""

    min_rows: int = Field(500, ge=1, description="below this a window is 'too few rows': never an alarm")
    fdr: float | None = Field(0.05, gt=0, lt=1, description="Benjamini-Hochberg q across p-value tests; "
                              "None: each p-value test stands alone")
    drift_share: float = Field(0.5, gt=0, le=1, description="share of drifted features for dataset drift")
    key_features: list[str] = Field([], description="any one of these drifting is dataset drift")
    persistence: int = Field(2, ge=1, le=100, description="consecutive drifted windows before the alarm")
    prediction_drift: bool = Field(True, description="the model's prediction drifting makes the window drifted")


class QualitySettings(Strict):
    """Data-quality verdict of a window: its own alarm, never a drift (retraining) reason."""

    great_expectations: bool = Field(True, description="run the dataset's GX suite on the window")
    max_missing_increase: float = Field(0.10, ge=0, le=1, description="missing share above the reference's by more")
    max_out_of_range_share: float = Field(0.0, ge=0, le=1, description="values outside the dataset's min/max")
    max_new_category_share: float = Field(0.01, ge=0, le=1, description="values of categories the reference lacks")


class ReportSettings(Strict):
    enabled: bool = True
    reference_rows: int = Field(5000, ge=100, le=1_000_000,
                                description="rows of the reference sample rebuilt from the profile for the report")
    max_current_rows: int = Field(50_000, ge=100, description="the window is sampled down to this for the report")
    seed: int = 0


class PerformanceSettings(Strict):
    """The label-free estimate of each window, and its realized figures as the outcomes land
    (flywheel/monitoring/realized.py). The minimum of labelled rows is the trigger rule's
    (`rules.performance_degraded.min_labelled_rows` in configs/triggers.yaml): one number for both."""

    lookback: Duration = Field(timedelta(days=35), description="windows that ended within this long are joined "
                               "again to the outcomes each run (cover the labels' delay)")
    n_boot: int = Field(200, ge=1, le=10_000, description="label draws of the estimate's interval")
    confidence: float = Field(0.95, gt=0, lt=1, description="of the estimate's interval")

    @field_validator("lookback")
    @classmethod
    def _positive(cls, value: timedelta) -> timedelta:
        if value <= timedelta(0):
            raise ValueError("lookback must be positive")
        return value


class DatasetPolicy(Strict):
    drift: DriftSettings = DriftSettings()
    alarm: AlarmSettings = AlarmSettings()
    quality: QualitySettings = QualitySettings()
    report: ReportSettings = ReportSettings()
    performance: PerformanceSettings = PerformanceSettings()

    def check_columns(self, numeric: list[str], categorical: list[str], source: str) -> None:
        """ConfigError naming every key or per-column entry that is not a feature of the profile."""
        names = set(numeric) | set(categorical)
        problems = [(source, "alarm.key_features", f"{k!r} is not a feature (features: {sorted(names)})")
                    for k in self.alarm.key_features if k not in names]
        for col, m in self.drift.columns.items():
            if col not in names:
                problems.append((source, f"drift.columns.{col}", f"not a feature (features: {sorted(names)})"))
            elif col in numeric and m.method in CATEGORICAL_ONLY:
                problems.append((source, f"drift.columns.{col}.method", f"{m.method} applies to categorical columns;"
                                 f" {col} is numeric"))
            elif col in categorical and m.method in NUMERIC_ONLY:
                problems.append((source, f"drift.columns.{col}.method", f"{m.method} applies to numeric columns;"
                                 f" {col} is categorical"))
        if problems:
            raise ConfigError(problems)


class MonitoringPolicy(Strict):
    """configs/monitoring.yaml: `defaults` for every dataset, `datasets.<name>` laid over them."""

    defaults: DatasetPolicy = DatasetPolicy()
    datasets: dict[str, dict[str, Any]] = {}

    @field_validator("datasets")
    @classmethod
    def _dataset_sections_are_valid(cls, value: dict[str, dict[str, Any]], info: ValidationInfo
                                    ) -> dict[str, dict[str, Any]]:
        defaults = info.data.get("defaults")
        if defaults is not None:  # absent when the defaults were invalid themselves (reported on their own)
            for name, own in value.items():
                _overlay(defaults, name, own)  # raises on a bad section, before a window is judged with it
        return value

    def for_dataset(self, name: str) -> DatasetPolicy:
        """The defaults with `datasets.<name>` laid over them section by section (key by key inside)."""
        own = self.datasets.get(name)
        return _overlay(self.defaults, name, own) if own else self.defaults


def _overlay(defaults: DatasetPolicy, name: str, own: dict[str, Any]) -> DatasetPolicy:
    merged = defaults.model_dump()
    for section, values in own.items():
        if section not in merged:
            raise ValueError(f"{name}.{section}: not a section (one of {sorted(merged)})")
        if not isinstance(values, dict):
            raise ValueError(f"{name}.{section}: must be a mapping")
        merged[section] = {**merged[section], **values}
    try:
        return DatasetPolicy.model_validate(merged)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise ValueError(f"{name}.{'.'.join(map(str, err['loc']))}: {err['msg']}") from None


def load_policy(path: Path) -> MonitoringPolicy:
    """Parse and check configs/monitoring.yaml; errors name the file and the key."""
    from flywheel.settings import load_yaml_model

    return load_yaml_model(MonitoringPolicy, Path(path))
