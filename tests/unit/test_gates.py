"""Promotion gates on real (small) sklearn models: each rule passes and fails on constructed cases."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from sklearn.compose import ColumnTransformer
from sklearn.dummy import DummyClassifier
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler

from flywheel import training
from flywheel.errors import FlywheelError
from flywheel.gates import (
    average_precision,
    evaluate_gates,
    expected_calibration_error,
    labels,
    positive_proba,
    render_gate_report,
    roc_auc,
)
from flywheel.schemas import DatasetDefinition, GateReport, GateResult, GatesConfig, load_dataset, load_gates
from flywheel.settings import ImputationConfig

PROJECT = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def ds() -> DatasetDefinition:
    return load_dataset(PROJECT / "configs" / "datasets" / "churn.yaml")


def gates(**overrides: dict[str, Any] | bool) -> GatesConfig:
    """The project's gates.yaml, made cheap for tests (few latency calls, few bootstrap samples).

    The latency budget is lifted far above any real model's cost: tests make no wall-clock assertions,
    except on clearly separated cases (a model sleeping 30 ms per call vs one that does not)."""
    data = load_gates(PROJECT / "configs" / "gates.yaml").model_dump()
    data["latency"].update(rows=20, service_budget_ms=10_000, model_share_ms=10_000)
    data["primary"]["bootstrap"]["samples"] = 50
    for key, value in overrides.items():
        if isinstance(value, dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return GatesConfig.model_validate(data)


def logreg(ds: DatasetDefinition, columns: list[str] | None = None) -> Pipeline:
    cols = columns or ds.feature_names
    num = [c for c in ds.numeric_features if c in cols]
    cat = [c for c in ds.categorical_features if c in cols]
    pre = ColumnTransformer(
        [
            ("num", make_pipeline(SimpleImputer(), StandardScaler()), num),
            (
                "cat",
                make_pipeline(
                    SimpleImputer(strategy="constant", fill_value="missing"), OneHotEncoder(handle_unknown="ignore")
                ),
                cat,
            ),
        ]
    )
    return make_pipeline(pre, LogisticRegression(max_iter=500))


@pytest.fixture(scope="module")
def data(small_batches: list[pd.DataFrame]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train, holdout): 10 days to fit on, the 4 most recent days to gate on."""
    return pd.concat(small_batches[:10], ignore_index=True), pd.concat(small_batches[10:], ignore_index=True)


@pytest.fixture(scope="module")
def models(ds: DatasetDefinition, data: tuple[pd.DataFrame, pd.DataFrame]) -> dict[str, Any]:
    train, _ = data
    x, y = train[ds.feature_names], labels(train, ds)
    shuffled = np.random.default_rng(0).permutation(y)
    return {
        "good": logreg(ds).fit(x, y),
        "shuffled": logreg(ds).fit(x, shuffled),
        "baseline": make_pipeline(DummyClassifier(strategy="prior")).fit(x, y),
    }


class Wrapped:
    """A fitted model whose positive-class probability is rewritten by `fn(X, inner_p)`."""

    def __init__(self, inner: Any, fn: Callable[[pd.DataFrame, np.ndarray], np.ndarray]) -> None:
        self.inner, self.fn = inner, fn
        self.feature_names_in_ = inner.feature_names_in_
        self.classes_ = inner.classes_

    def predict_proba(self, x: pd.DataFrame) -> np.ndarray:
        p = np.asarray(self.fn(x, self.inner.predict_proba(x)[:, 1]), dtype=float)
        return np.column_stack([1 - p, p])


def run(models: dict[str, Any], data: tuple, ds: DatasetDefinition, cfg: GatesConfig | None = None, **kw: Any):
    args: dict[str, Any] = {
        "holdout": data[1],
        "candidate": models["good"],
        "champion": None,
        "baseline": models["baseline"],
        "train_metric": 0.85,
        "validation_metric": 0.84,
    }
    args.update(kw)
    return evaluate_gates(dataset=ds, cfg=cfg or gates(), **args)


def by_rule(report: GateReport) -> dict[str, GateResult]:
    return {r.rule: r for r in report.results}


# -------------------------------------------------------------------------------- whole-report paths


def test_first_model_passes_and_comparison_rules_are_not_applicable(models, data, ds):
    report = run(models, data, ds, candidate_version="1")
    rules = by_rule(report)
    assert report.passed, report.failed_rules
    assert report.candidate_version == "1" and report.champion_version is None
    vs = rules["vs_champion"]
    assert vs.passed and not vs.gated and "not applicable" in vs.detail
    slices = [r for r in report.results if r.rule.startswith("slice:")]
    assert {r.rule for r in slices} >= {"slice:region=north", "slice:segment=consumer"}
    assert all(not r.gated and r.passed for r in slices)
    expected = {"primary", "calibration", "latency", "fairness", "baseline", "overfitting"}
    expected |= {f"behavioral:{t.name}" for t in ds.behavioral.tests}
    assert expected <= set(rules)
    assert "CI [" in rules["primary"].detail
    assert rules["latency"].value is not None and rules["latency"].value > 0


def test_champion_is_rescored_good_candidate_beats_shuffled_champion(models, data, ds):
    _, holdout = data
    report = run(models, data, ds, champion=models["shuffled"], champion_version="4")
    vs = by_rule(report)["vs_champion"]
    assert vs.passed and vs.gated
    y = labels(holdout, ds)
    champ_auc = roc_auc_score(y, positive_proba(models["shuffled"], holdout, ds))
    cand_auc = roc_auc_score(y, positive_proba(models["good"], holdout, ds))
    assert vs.value == pytest.approx(cand_auc - champ_auc)
    assert f"champion {champ_auc:.4f}" in vs.detail and "paired 95% CI" in vs.detail
    assert report.champion_version == "4"


def test_shuffled_candidate_fails_against_good_champion(models, data, ds):
    report = run(models, data, ds, candidate=models["shuffled"], champion=models["good"])
    rules = by_rule(report)
    assert not report.passed
    assert not rules["vs_champion"].passed and rules["vs_champion"].value < -0.1
    assert not rules["primary"].passed  # near 0.5, under the 0.65 floor
    assert not rules["baseline"].passed
    assert {"primary", "vs_champion", "baseline"} <= set(report.failed_rules)


def test_champion_uses_the_columns_it_was_fitted_on(models, data, ds):
    train, _ = data
    cols = ["tenure_months", "support_tickets_30d", "contract_type"]
    champion = logreg(ds, cols).fit(train[cols], labels(train, ds))
    vs = by_rule(run(models, data, ds, champion=champion))["vs_champion"]
    assert vs.gated and vs.value is not None, vs.detail


def test_champion_that_cannot_be_scored_fails_closed(models, data, ds):
    train, _ = data
    extra = train.assign(loyalty_points=1.0)  # a feature the current holdout no longer has
    cols = [*ds.feature_names, "loyalty_points"]
    champion = Pipeline(
        [
            ("pre", ColumnTransformer([("keep", "passthrough", ["tenure_months", "loyalty_points"])])),
            ("lr", LogisticRegression()),
        ]
    ).fit(extra[cols], labels(train, ds))
    report = run(models, data, ds, champion=champion)
    rules = by_rule(report)
    assert not report.passed
    assert not rules["vs_champion"].passed and rules["vs_champion"].gated
    assert "could not be scored" in rules["vs_champion"].detail and "loyalty_points" in rules["vs_champion"].detail
    gated_slices = [r for r in report.results if r.rule.startswith("slice:") and r.gated]
    assert gated_slices and all(not r.passed for r in gated_slices)
    assert rules["primary"].passed  # the absolute rules are unaffected


def test_single_class_holdout_and_unscorable_candidate_raise(models, data, ds):
    _, holdout = data
    with pytest.raises(FlywheelError, match="single class"):
        run(models, data, ds, holdout=holdout.assign(churned="no"))
    with pytest.raises(FlywheelError, match=r"candidate could not be scored.*tenure_months"):
        run(models, data, ds, holdout=holdout.drop(columns=["tenure_months"]))


# ------------------------------------------------------------------------------------- single rules


def test_primary_floor_fails_when_raised(models, data, ds):
    rule = by_rule(run(models, data, ds, cfg=gates(primary={"min_value": 0.99})))["primary"]
    assert not rule.passed and rule.gated and 0.6 < rule.value < 0.99


def test_average_precision_is_supported(models, data, ds):
    rule = by_rule(run(models, data, ds, cfg=gates(primary={"metric": "average_precision", "min_value": 0.2})))
    assert rule["primary"].threshold.startswith("average_precision") and rule["primary"].passed


def test_slice_regression_fails_only_that_slice(models, data, ds):
    def random_in_north(x: pd.DataFrame, p: np.ndarray) -> np.ndarray:
        return np.where(x["region"].to_numpy() == "north", 0.1, p)  # no ranking at all in the north

    candidate = Wrapped(models["good"], random_in_north)
    rules = by_rule(run(models, data, ds, candidate=candidate, champion=models["good"]))
    north, south = rules["slice:region=north"], rules["slice:region=south"]
    assert north.gated and not north.passed and north.value > 0.3
    assert south.gated and south.passed and south.value == pytest.approx(0.0)


def test_small_slices_are_reported_not_gated(models, data, ds):
    report = run(models, data, ds, cfg=gates(slices={"min_rows": 10_000}), champion=models["shuffled"])
    slices = [r for r in report.results if r.rule.startswith("slice:")]
    assert slices and all(not r.gated for r in slices)
    assert all("fewer than 10000 rows" in r.detail for r in slices)
    # the default min_rows (200) leaves the 146-row-ish enterprise slice ungated but gates the others
    default = by_rule(run(models, data, ds, champion=models["shuffled"]))
    assert not default["slice:segment=enterprise"].gated and default["slice:region=north"].gated


def test_calibration_fails_for_squashed_probabilities(models, data, ds):
    squashed = Wrapped(models["good"], lambda _x, p: 0.5 + 0.5 * p)
    rule = by_rule(run(models, data, ds, candidate=squashed))["calibration"]
    assert not rule.passed and rule.value > 0.3
    assert by_rule(run(models, data, ds))["calibration"].passed


@pytest.mark.parametrize("metric", ["roc_auc", "average_precision"])
def test_metrics_match_sklearn_including_ties(metric):
    from sklearn.metrics import average_precision_score

    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 500)
    p = np.round(rng.random(500) * 0.6 + 0.3 * y, 2)  # rounded: many tied scores
    ours = {"roc_auc": roc_auc, "average_precision": average_precision}[metric](y, p)
    theirs = {"roc_auc": roc_auc_score, "average_precision": average_precision_score}[metric](y, p)
    assert ours == pytest.approx(theirs, abs=1e-12)


def test_expected_calibration_error_values():
    y = np.array([0, 0, 1, 1])
    assert expected_calibration_error(y, np.array([0.5, 0.5, 0.5, 0.5]), 10) == pytest.approx(0.0)
    assert expected_calibration_error(np.zeros(4), np.ones(4), 10) == pytest.approx(1.0)
    # two bins: [0.05,0.05] with rate 0 -> 0.05; [0.95,0.95] with rate 1 -> 0.05
    assert expected_calibration_error(y, np.array([0.05, 0.05, 0.95, 0.95]), 10) == pytest.approx(0.05)


class Sleepy(Wrapped):
    def __init__(self, inner: Any, seconds: float) -> None:
        super().__init__(inner, lambda _x, p: p)
        self.seconds = seconds

    def predict_proba(self, x: pd.DataFrame) -> np.ndarray:
        time.sleep(self.seconds)
        return np.tile([0.7, 0.3], (len(x), 1))


def test_latency_slow_model_fails_fast_model_passes(models, data, ds):
    cfg = gates(latency={"service_budget_ms": 10, "model_share_ms": 3})  # the real 3 ms share
    slow = by_rule(run(models, data, ds, cfg=cfg, candidate=Sleepy(models["good"], 0.030)))["latency"]
    assert not slow.passed and slow.value >= 30.0 and slow.gated
    assert "threadpool_limits(1)" in slow.detail and "OMP_NUM_THREADS" in slow.detail
    assert "timed path: pipeline" in slow.detail  # a stand-in with no compilable steps serves through predict_proba
    assert slow.threshold.startswith("p99 <= 3 ms")
    fast = by_rule(run(models, data, ds, cfg=cfg, candidate=Sleepy(models["good"], 0.0)))["latency"]
    assert fast.passed


def test_fairness_passes_on_real_groups_and_lists_excluded_groups(models, data, ds):
    _, holdout = data
    tiny = holdout.copy()
    tiny.loc[:9, "age_group"] = "75+"  # 10 rows: under min_group_rows
    rule = by_rule(run(models, data, ds, holdout=tiny))["fairness"]
    assert rule.passed and rule.gated
    assert "excluded" in rule.detail and "75+ (n=10)" in rule.detail


def test_fairness_demographic_parity_and_equal_opportunity_fail(models, data, ds):
    _, holdout = data
    p = positive_proba(models["good"], holdout, ds)
    biased = holdout.assign(age_group=np.where(p >= 0.2, "A", "B"))  # groups = the model's own decision
    assert (p >= 0.2).sum() >= 50
    cfg = gates(fairness={"decision_threshold": 0.2})
    dp = by_rule(run(models, data, ds, cfg=cfg, holdout=biased))["fairness"]
    assert not dp.passed and dp.value == pytest.approx(1.0)
    cfg = gates(fairness={"decision_threshold": 0.2, "metric": "equal_opportunity_difference", "min_group_rows": 5})
    eo = by_rule(run(models, data, ds, cfg=cfg, holdout=biased))["fairness"]
    assert not eo.passed and eo.value == pytest.approx(1.0) and "TPR" in eo.detail


def test_fairness_without_protected_attribute_is_not_gated(models, data, ds):
    plain = ds.model_copy(update={"protected_attribute": None})
    rule = by_rule(run(models, data, plain))["fairness"]
    assert rule.passed and not rule.gated and "no protected attribute" in rule.detail


def test_baseline_margin(models, data, ds):
    assert by_rule(run(models, data, ds))["baseline"].passed
    rule = by_rule(run(models, data, ds, candidate=models["baseline"]))["baseline"]
    assert not rule.passed and rule.value == pytest.approx(0.0)


@pytest.fixture(scope="module")
def time_split(small_batches: list[pd.DataFrame], ds: DatasetDefinition) -> training.Split:
    """The training flow's split of the 14 generated days: train, validation, the last 7 days as holdout."""
    return training.split_by_time(pd.concat(small_batches, ignore_index=True), ds)


def _auc(model: Any, frame: pd.DataFrame, ds: DatasetDefinition) -> float:
    return roc_auc_score(labels(frame, ds), positive_proba(model, frame, ds))


def _vs_real_baseline(
    ds: DatasetDefinition, split: training.Split, cfg: GatesConfig, columns: list[str]
) -> tuple[training.Baseline, GateReport]:
    """Gates for a logistic regression on `columns` (refit on train + validation, as the flow does) against the
    baseline `cfg` declares, fitted on the same split. Its champion is the same model fitted on train only,
    so the comparison rules are gated; train / validation metrics are the model's own (overfitting rule)."""
    baseline = training.fit_baseline(split, ds, cfg.baseline, cfg.primary.metric, ImputationConfig(), seed=0)
    on_train = logreg(ds, columns).fit(split.train[ds.feature_names], labels(split.train, ds))
    tv = split.train_validation
    candidate = logreg(ds, columns).fit(tv[ds.feature_names], labels(tv, ds))
    report = evaluate_gates(
        candidate, on_train, baseline, split.holdout, ds, cfg,
        _auc(on_train, split.train, ds), _auc(on_train, split.validation, ds), seed=0,
    )  # fmt: skip
    return baseline, report


BASELINE_KINDS = [{"kind": "best_single_feature", "max_depth": 3}, {"kind": "shallow_tree", "max_depth": 2}]


@pytest.mark.parametrize("rule", BASELINE_KINDS, ids=lambda r: r["kind"])
def test_baseline_alone_rejects_a_model_that_only_uses_the_best_single_feature(rule, time_split, ds):
    cfg = gates(baseline=rule)
    best = next(iter(training.best_single_feature(time_split, ds, "roc_auc", ImputationConfig(), 3, seed=0)))
    baseline, report = _vs_real_baseline(ds, time_split, cfg, [best])
    rules = by_rule(report)
    # every other gated rule passes, and is gated: the champion comparison, slices and behavioral included
    assert report.failed_rules == ["baseline"], [(r.rule, r.detail) for r in report.results if not r.passed]
    gated = {r.rule for r in report.results if r.gated}
    assert {"primary", "vs_champion", "calibration", "latency", "fairness", "overfitting"} <= gated
    assert {"slice:region=north", "slice:segment=consumer"} <= gated
    assert {f"behavioral:{t.name}" for t in ds.behavioral.tests} <= gated
    assert rules["primary"].value >= cfg.primary.min_value
    rule_result = rules["baseline"]
    assert rule_result.gated and not rule_result.passed and rule_result.value < cfg.baseline.min_margin
    assert rule_result.value == pytest.approx(rules["primary"].value - _auc(baseline.pipeline, time_split.holdout, ds))
    assert baseline.kind == rule["kind"] and f"baseline: {rule['kind']}" in rule_result.detail
    if rule["kind"] == "best_single_feature":  # the baseline found the feature the candidate relies on
        assert baseline.feature == best and f"{best!r}" in rule_result.detail
        assert f"validation roc_auc {baseline.validation_scores[best]:.4f}" in rule_result.detail
    else:
        assert baseline.feature is None and "depth-2 tree on every feature" in rule_result.detail


@pytest.mark.parametrize("rule", BASELINE_KINDS, ids=lambda r: r["kind"])
def test_baseline_is_beaten_by_a_model_using_every_feature(rule, time_split, ds):
    cfg = gates(baseline=rule)
    _, report = _vs_real_baseline(ds, time_split, cfg, ds.feature_names)
    assert report.passed, report.failed_rules
    assert by_rule(report)["baseline"].value >= cfg.baseline.min_margin


def test_overfitting_gap(models, data, ds):
    rule = by_rule(run(models, data, ds, train_metric=0.95, validation_metric=0.80))["overfitting"]
    assert not rule.passed and rule.value == pytest.approx(0.15)
    assert by_rule(run(models, data, ds, train_metric=0.86, validation_metric=0.84))["overfitting"].passed


# --------------------------------------------------------------------------------------- behavioral


def test_behavioral_directional_and_invariance_violations(models, data, ds):
    def violates(x: pd.DataFrame, p: np.ndarray) -> np.ndarray:
        # risk falls with tickets (wrong way) and north customers are flagged regardless of behaviour
        p = p * np.exp(-0.2 * x["support_tickets_30d"].fillna(0).to_numpy())
        return np.where(x["region"].to_numpy() == "north", 0.95, p)

    report = run(models, data, ds, candidate=Wrapped(models["good"], violates))
    rules = by_rule(report)
    tickets, region = rules["behavioral:more_tickets_more_risk"], rules["behavioral:region_does_not_matter_much"]
    assert not tickets.passed and tickets.gated and tickets.value < 0.8
    assert not region.passed and region.value > 0.5
    assert ds.behavioral.version in tickets.detail
    assert rules["behavioral:longer_tenure_less_risk"].passed  # tenure still lowers the risk
    assert {"behavioral:more_tickets_more_risk", "behavioral:region_does_not_matter_much"} <= set(report.failed_rules)


def test_behavioral_exception_is_a_failure_not_a_crash(models, data, ds):
    def no_empty_rows(x: pd.DataFrame, p: np.ndarray) -> np.ndarray:
        if x["tenure_months"].isna().all():
            raise ValueError("cannot score a customer without history")
        return p

    report = run(models, data, ds, candidate=Wrapped(models["good"], no_empty_rows))
    rule = by_rule(report)["behavioral:entity_without_history"]
    assert not rule.passed and rule.gated
    assert "ValueError" in rule.detail and "without history" in rule.detail
    assert not report.passed


def test_behavioral_not_required_reports_without_gating(models, data, ds):
    candidate = Wrapped(models["good"], lambda x, p: np.where(x["region"].to_numpy() == "north", 0.95, p))
    report = run(models, data, ds, cfg=gates(behavioral_required=False), candidate=candidate)
    region = by_rule(report)["behavioral:region_does_not_matter_much"]
    assert not region.passed and not region.gated
    assert "behavioral:region_does_not_matter_much" not in report.failed_rules


def test_minimum_functionality_passes_for_real_pipeline(models, data, ds):
    rule = by_rule(run(models, data, ds))["behavioral:entity_without_history"]
    assert rule.passed and 0.0 <= rule.value <= 1.0


# ------------------------------------------------------------------------------------ report / verdict


def test_report_passed_semantics_ignore_ungated_failures():
    ok = GateResult(rule="a", value=1.0, threshold="x", passed=True)
    info = GateResult(rule="b", value=None, threshold="x", passed=False, gated=False)
    bad = GateResult(rule="c", value=0.0, threshold="x", passed=False)
    assert GateReport(results=[ok, info]).passed
    assert GateReport(results=[ok, info]).failed_rules == []
    assert not GateReport(results=[ok, info, bad]).passed
    assert GateReport(results=[ok, info, bad]).failed_rules == ["c"]


def test_markdown_has_verdict_first_and_every_rule(models, data, ds):
    report = run(models, data, ds, candidate=models["shuffled"], champion=models["good"], champion_version="2")
    md = render_gate_report(report, "Gate report: churn v3")
    first = next(line for line in md.splitlines() if line.strip() and not line.startswith("#"))
    assert first.startswith("**Verdict: REJECTED**") and "vs_champion" in first
    for r in report.results:
        assert f"| {r.rule} |" in md
    assert "| rule | value | threshold | result | detail |" in md
    assert "max \\|dp\\|" in md  # pipes inside cells are escaped
    passed = render_gate_report(run(models, data, ds), "ok")
    assert "**Verdict: PASSED**" in passed
