"""Typed contracts that cross module lines: dataset definitions, gate rules, results of each stage."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from flywheel.errors import ConfigError
from flywheel.settings import Section, load_yaml_model

# ------------------------------------------------------------------------------ dataset definition

FeatureType = Literal["float", "int", "category", "bool"]


class FeatureSpec(Section):
    name: str
    type: FeatureType
    min: float | None = None
    max: float | None = None
    allowed: list[str] | None = None  # categorical domain
    nullable: bool = True
    description: str = ""

    @property
    def is_numeric(self) -> bool:
        return self.type in ("float", "int", "bool")


class SplitPolicy(Section):
    """Time-based split: the most recent `holdout_days` are the holdout; the rest splits by time."""

    holdout_days: int = Field(7, ge=1)
    validation_share: float = Field(0.2, gt=0.0, lt=0.9)


class BehavioralTest(Section):
    name: str
    kind: Literal["minimum_functionality", "invariance", "directional"]
    feature: str | None = None
    # invariance: swap `feature` through `values`; directional: add `delta` to `feature`
    values: list[Any] = []
    delta: float | None = None
    direction: Literal["increase", "decrease"] = "increase"
    max_delta: float = Field(0.05, ge=0)  # invariance tolerance on the probability
    min_share: float = Field(0.9, ge=0, le=1)  # directional: share of rows that must move the right way
    rows: int = Field(200, ge=1)

    @model_validator(mode="after")
    def _check_kind(self) -> BehavioralTest:
        if self.kind in ("invariance", "directional") and not self.feature:
            raise ValueError(f"{self.kind} test {self.name!r} needs `feature`")
        if self.kind == "invariance" and not self.values:
            raise ValueError(f"invariance test {self.name!r} needs `values`")
        if self.kind == "directional" and self.delta is None:
            raise ValueError(f"directional test {self.name!r} needs `delta`")
        return self


class BehavioralSuite(Section):
    version: str = "1"
    tests: list[BehavioralTest] = []


class OutcomesSource(Section):
    """Where a dataset's outcomes (delayed labels) arrive: their own batch files, apart from the feature
    batches. Each row names the entity, the event time of the feature snapshot it describes (the dataset's
    `timestamp` column), the label (the dataset's `label` column) and when it arrived (the dataset's
    `label_timestamp` column). The dataset's context columns (slices that are not features, the protected
    attribute) may ride along. `flywheel outcomes ingest FILE` validates a batch and stores it in
    `flywheel_outcomes`; a batch that fails is quarantined, never deleted."""

    source: Path | None = None  # a folder of label batches (labels_<date>.parquet) or one file; None: ingest by hand
    format: Literal["parquet", "csv"] = "parquet"
    label_values: list[str | int | bool] = Field(min_length=2)  # every value a label may take, positive_label included
    # training on served features (`training_source: served_features`, or a trigger rule's) needs at least this
    # many (snapshot, outcome) rows joined; fewer fail the run, naming both (it never falls back to the offline store)
    min_training_rows: int = Field(1000, ge=1)


class DatasetDefinition(Section):
    """One YAML file describes a dataset; everything downstream (GX suite, Feast repo, slices, gates
    on slices and fairness, behavioral tests) is derived from it."""

    name: str = Field(pattern=r"^[a-z][a-z0-9_]{0,40}$")
    description: str = ""
    source: Path  # a parquet/CSV file, or a folder of them (one file per batch)
    format: Literal["parquet", "csv"] = "parquet"
    entity: str
    entity_type: Literal["int", "string"] = "int"
    timestamp: str
    created_timestamp: str | None = None  # when the row arrived; defaults to the event time
    label: str
    positive_label: str | int | bool = 1
    label_timestamp: str | None = None  # when the label became known (in outcome batches: their arrival time)
    outcomes: OutcomesSource | None = None  # delayed labels arriving as their own batches (see OutcomesSource)
    # what training reads: the offline store's point-in-time join, or the features the online service
    # actually used (the prediction log) joined with their outcomes
    training_source: Literal["offline_store", "served_features"] = "offline_store"
    features: list[FeatureSpec] = Field(min_length=1)
    slices: list[str] = []
    protected_attribute: str | None = None
    split: SplitPolicy = SplitPolicy()
    behavioral: BehavioralSuite = BehavioralSuite()
    owner: str = "flywheel"

    @model_validator(mode="after")
    def _check_columns(self) -> DatasetDefinition:
        names = [f.name for f in self.features]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate feature names: {dupes}")
        reserved = {self.entity, self.timestamp, self.label}
        clash = sorted(reserved & set(names))
        if clash:
            raise ValueError(f"features may not reuse the entity/timestamp/label column: {clash}")
        for t in self.behavioral.tests:
            if t.feature and t.feature not in names:
                raise ValueError(f"behavioral test {t.name!r} names unknown feature {t.feature!r}")
        if self.outcomes is not None:
            if not self.label_timestamp:
                raise ValueError("outcomes need `label_timestamp`: the column holding when each label arrived")
            if self.positive_label not in self.outcomes.label_values:
                raise ValueError(f"outcomes.label_values {self.outcomes.label_values} must include "
                                 f"positive_label {self.positive_label!r}")
        if self.training_source == "served_features" and self.outcomes is None:
            raise ValueError("training_source: served_features joins served features with outcomes: "
                             "declare `outcomes`")
        return self

    @property
    def feature_names(self) -> list[str]:
        return [f.name for f in self.features]

    @property
    def numeric_features(self) -> list[str]:
        return [f.name for f in self.features if f.is_numeric]

    @property
    def categorical_features(self) -> list[str]:
        return [f.name for f in self.features if not f.is_numeric]

    @property
    def context_columns(self) -> list[str]:
        """Columns carried with the label (entity rows), not served as features: slices, protected."""
        cols = [c for c in self.slices if c not in self.feature_names]
        if self.protected_attribute and self.protected_attribute not in self.feature_names + cols:
            cols.append(self.protected_attribute)
        return cols

    @property
    def required_columns(self) -> list[str]:
        cols = [self.entity, self.timestamp, self.label, *self.feature_names, *self.context_columns]
        for c in (self.created_timestamp, self.label_timestamp):
            if c:
                cols.append(c)
        return list(dict.fromkeys(cols))


def load_dataset(path: Path | str) -> DatasetDefinition:
    return load_yaml_model(DatasetDefinition, Path(path))


# ------------------------------------------------------------------------------------ gate rules


class BootstrapRule(Section):
    samples: int = Field(300, ge=10, le=10_000)
    confidence: float = Field(0.95, gt=0.5, lt=1.0)


class PrimaryRule(Section):
    metric: Literal["roc_auc", "average_precision"] = "roc_auc"
    min_value: float = Field(0.6, ge=0, le=1)  # absolute floor
    max_drop_vs_champion: float = Field(0.01, ge=0, le=1)  # epsilon
    bootstrap: BootstrapRule = BootstrapRule()


class SliceRule(Section):
    max_relative_drop: float = Field(0.05, ge=0, le=1)
    min_rows: int = Field(200, ge=1)


class CalibrationRule(Section):
    max_ece: float = Field(0.1, ge=0, le=1)
    bins: int = Field(10, ge=2, le=100)


class LatencyRule(Section):
    service_budget_ms: float = Field(10.0, gt=0)  # the online service's p99 per request, end to end
    model_share_ms: float = Field(3.0, gt=0)  # the served predictor's p99 for one row, of that budget
    rows: int = Field(300, ge=20)

    @model_validator(mode="after")
    def _share_fits(self) -> LatencyRule:
        if self.model_share_ms > self.service_budget_ms:
            raise ValueError(
                f"model_share_ms ({self.model_share_ms:g}) exceeds service_budget_ms ({self.service_budget_ms:g})"
            )
        return self


class FairnessRule(Section):
    metric: Literal["demographic_parity_difference", "equal_opportunity_difference"] = (
        "demographic_parity_difference"
    )
    max_difference: float = Field(0.1, ge=0, le=1)
    decision_threshold: float = Field(0.5, gt=0, lt=1)
    min_group_rows: int = Field(50, ge=1)


class BestSingleFeatureBaseline(Section):
    """Per feature, a depth-limited tree on that feature alone (the pipeline's imputation / one-hot) is fit
    on train and scored on validation; the best one is refit on train + validation."""

    kind: Literal["best_single_feature"]
    min_margin: float = Field(0.05, ge=0, le=1)  # candidate - baseline, on the primary metric
    max_depth: int = Field(3, ge=1, le=6)  # of the one-feature tree


class ShallowTreeBaseline(Section):
    """A depth-limited tree on every feature (the pipeline's imputation / one-hot), fit on train + validation."""

    kind: Literal["shallow_tree"]
    min_margin: float = Field(0.05, ge=0, le=1)
    max_depth: int = Field(2, ge=1, le=4)


# `kind` picks the model: a typo or a missing kind fails at load, naming the allowed kinds.
BaselineRule = Annotated[BestSingleFeatureBaseline | ShallowTreeBaseline, Field(discriminator="kind")]


class OverfittingRule(Section):
    max_gap: float = Field(0.05, ge=0, le=1)


class GatesConfig(Section):
    primary: PrimaryRule = PrimaryRule()
    slices: SliceRule = SliceRule()
    calibration: CalibrationRule = CalibrationRule()
    latency: LatencyRule = LatencyRule()
    fairness: FairnessRule = FairnessRule()
    baseline: BaselineRule = BestSingleFeatureBaseline(kind="best_single_feature")
    overfitting: OverfittingRule = OverfittingRule()
    behavioral_required: bool = True


def load_gates(path: Path | str, overrides: dict[str, dict[str, Any]] | None = None) -> GatesConfig:
    """The gate rules from `path`, with a profile's `evaluate.gate_overrides` laid over each section."""
    gates = load_yaml_model(GatesConfig, Path(path))
    if not overrides:
        return gates
    data = gates.model_dump()
    for section, values in overrides.items():
        if section not in data or not isinstance(data[section], dict):
            raise ConfigError([("settings", f"evaluate.gate_overrides.{section}", "not a section of the gates file")])
        data[section] = {**data[section], **values}
    try:
        return GatesConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError([("settings", "evaluate.gate_overrides." + ".".join(str(p) for p in e["loc"]), e["msg"])
                           for e in exc.errors()]) from None


# -------------------------------------------------------------------------------- stage results


class Result(BaseModel):
    model_config = ConfigDict(frozen=True)


class GateResult(Result):
    rule: str
    value: float | None
    threshold: str
    passed: bool
    gated: bool = True  # False: reported only (e.g. a slice under the minimum row count)
    detail: str = ""


class GateReport(Result):
    candidate_version: str | None = None
    champion_version: str | None = None
    candidate_inference: str | None = None  # the path the candidate serves through (and was timed on)
    champion_inference: str | None = None
    results: list[GateResult]

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.results if r.gated)

    @property
    def failed_rules(self) -> list[str]:
        return [r.rule for r in self.results if r.gated and not r.passed]
