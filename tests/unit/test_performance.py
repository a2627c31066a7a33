"""Performance without labels (flywheel/monitoring/performance.py): known answers on tiny arrays, the
O(n log n) expected AUC against the O(n^2) definition, and the estimate against real labels from the
project's generator under covariate drift (it follows) and concept drift (it cannot see)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from flywheel.datagen import DriftSpec, GeneratorSpec, generate
from flywheel.gates import roc_auc
from flywheel.monitoring.performance import (
    COVARIATE_TOLERANCE,
    Estimate,
    MetricEstimate,
    Performance,
    estimate_error,
    estimate_performance,
    expected_accuracy,
    expected_roc_auc,
    realized_performance,
)
from flywheel.schemas import load_dataset
from flywheel.settings import ImputationConfig
from flywheel.training import build_pipeline, fit, labels, predict_scores

PROJECT = Path(__file__).resolve().parents[2]


def _pairwise_auc(p: np.ndarray) -> float:
    """The definition, over every ordered pair of distinct rows: O(n^2), for checking only."""
    num = den = 0.0
    for i in range(len(p)):
        for j in range(len(p)):
            if i != j:
                w = p[i] * (1 - p[j])
                num += w * (1.0 if p[i] > p[j] else 0.5 if p[i] == p[j] else 0.0)
                den += w
    return num / den


# ------------------------------------------------------------------------------------- known answers


def test_coin_flip_probabilities_estimate_half() -> None:
    p = np.full(10, 0.5)
    est = estimate_performance(p, n_boot=200, confidence=0.9, seed=0)
    assert est.accuracy.value == pytest.approx(0.5)
    assert est.roc_auc.value == pytest.approx(0.5)
    assert est.n == 10
    assert est.expected_positive_rate == pytest.approx(0.5)


def test_separated_confident_probabilities_estimate_near_one() -> None:
    p = np.r_[np.full(20, 0.001), np.full(20, 0.999)]
    est = estimate_performance(p, n_boot=200, confidence=0.9, seed=0)
    assert est.accuracy.value == pytest.approx(0.999)
    assert est.roc_auc.value > 0.99
    assert est.roc_auc.lower > 0.95 and est.accuracy.lower > 0.95


def test_expected_accuracy_is_the_expected_confusion_matrix() -> None:
    p = np.array([0.1, 0.3, 0.5, 0.9])  # 0.5 is predicted positive (p >= threshold)
    tp, fp = 0.5 + 0.9, 0.5 + 0.1
    tn, fn = 0.9 + 0.7, 0.1 + 0.3
    assert tp + fp + tn + fn == pytest.approx(len(p))
    assert expected_accuracy(p) == pytest.approx((tp + tn) / len(p))


@pytest.mark.parametrize("seed", range(5))
def test_expected_auc_equals_the_pairwise_definition(seed: int) -> None:
    rng = np.random.default_rng(seed)
    p = np.round(rng.random(25), 1)  # rounded: plenty of ties
    assert expected_roc_auc(p) == pytest.approx(_pairwise_auc(p), abs=1e-12)


def test_expected_auc_of_rows_that_cannot_be_one_class_or_the_other() -> None:
    assert np.isnan(expected_roc_auc(np.zeros(5)))  # no row can be positive: no AUC
    assert np.isnan(expected_roc_auc(np.ones(5)))
    assert expected_accuracy(np.zeros(5)) == 1.0  # all predicted negative, all surely negative


def test_estimates_are_the_monte_carlo_means() -> None:
    """Expected accuracy is exactly the mean of the realized accuracy over label draws; the expected
    AUC (a ratio of expectations) is its mean up to O(1/n)."""
    rng = np.random.default_rng(3)
    p = rng.beta(1.0, 2.5, size=400)
    accs, aucs = [], []
    for _ in range(1500):
        y = (rng.random(p.size) < p).astype(int)
        r = realized_performance(y, p)
        accs.append(r.accuracy)
        aucs.append(r.roc_auc)
    assert np.mean(accs) == pytest.approx(expected_accuracy(p), abs=4 * np.std(accs) / np.sqrt(len(accs)))
    assert np.mean(aucs) == pytest.approx(expected_roc_auc(p), abs=0.003)


def test_invariances() -> None:
    """Realized AUC is a ranking statistic: invariant to a strictly increasing transform of the scores.
    The estimate is not (the probabilities are read as probabilities: sharpening them claims more skill),
    but it does not depend on the rows' order."""
    rng = np.random.default_rng(1)
    p = rng.random(60)
    y = (rng.random(60) < p).astype(int)
    sharper = p**3 / (p**3 + (1 - p) ** 3)  # strictly increasing on [0, 1]
    assert realized_performance(y, sharper).roc_auc == pytest.approx(realized_performance(y, p).roc_auc)
    assert expected_roc_auc(sharper) > expected_roc_auc(p) + 0.05
    perm = rng.permutation(60)
    assert estimate_performance(p[perm], 50, 0.9, seed=2).roc_auc.value == pytest.approx(
        estimate_performance(p, 50, 0.9, seed=2).roc_auc.value
    )


def test_interval_brackets_the_estimate_and_is_seeded() -> None:
    p = np.random.default_rng(5).beta(1.0, 3.0, size=500)
    a = estimate_performance(p, n_boot=300, confidence=0.95, seed=11)
    b = estimate_performance(p, n_boot=300, confidence=0.95, seed=11)
    assert a == b
    for m in (a.roc_auc, a.accuracy):
        assert m.lower < m.value < m.upper
    narrow = estimate_performance(p, n_boot=300, confidence=0.5, seed=11)
    assert narrow.roc_auc.upper - narrow.roc_auc.lower < a.roc_auc.upper - a.roc_auc.lower


def test_realized_performance_uses_the_shared_metrics() -> None:
    y = np.array([0, 0, 1, 1])
    p = np.array([0.1, 0.4, 0.35, 0.8])
    r = realized_performance(y, p)
    assert r == Performance(roc_auc=0.75, accuracy=0.75, n=4, positive_rate=0.5)
    assert r.roc_auc == roc_auc(y, p)
    assert np.isnan(realized_performance(np.zeros(4, dtype=int), p).roc_auc)  # one class: no AUC


def test_estimate_error() -> None:
    est = Estimate(
        roc_auc=MetricEstimate(0.80, 0.78, 0.82),
        accuracy=MetricEstimate(0.90, 0.89, 0.91),
        n=100,
        expected_positive_rate=0.1,
        confidence=0.95,
        n_boot=10,
    )
    err = estimate_error(est, Performance(roc_auc=0.75, accuracy=0.905, n=100, positive_rate=0.1))
    assert err.roc_auc.error == pytest.approx(0.05) and not err.roc_auc.covered
    assert err.accuracy.error == pytest.approx(-0.005) and err.accuracy.covered
    assert err.max_abs_error == pytest.approx(0.05)
    assert err.as_dict()["roc_auc"]["covered"] is False
    with pytest.raises(ValueError, match="100 rows"):
        estimate_error(est, Performance(roc_auc=0.75, accuracy=0.9, n=90, positive_rate=0.1))


@pytest.mark.parametrize("bad", [np.array([]), np.array([0.2, 1.2]), np.array([0.2, np.nan]), np.array([-0.1])])
def test_rejects_what_is_not_probabilities(bad: np.ndarray) -> None:
    with pytest.raises(ValueError):
        estimate_performance(bad, n_boot=10, confidence=0.9, seed=0)


def test_rejects_bad_arguments() -> None:
    p = np.array([0.2, 0.7])
    with pytest.raises(ValueError, match="n_boot"):
        estimate_performance(p, n_boot=0, confidence=0.9, seed=0)
    with pytest.raises(ValueError, match="confidence"):
        estimate_performance(p, n_boot=10, confidence=1.0, seed=0)
    with pytest.raises(ValueError, match="labels"):
        realized_performance(np.array([0, 1, 1]), p)
    with pytest.raises(ValueError, match="0 or 1"):
        realized_performance(np.array([0, 2]), p)


# ------------------------------------------------------------------------------- on the generator

TRAIN_DAYS = 14  # drift-free days the model is fitted on
WINDOW_DAYS = 14  # drifted days the estimate is judged on: 28,000 rows (see COVARIATE_TOLERANCE)
ROWS_PER_DAY = 2000


def _window(spec: GeneratorSpec, first: int) -> pd.DataFrame:
    """Days `first`.. of `spec`, as one frame (same seed: same customers and inputs whatever the drift)."""
    return pd.concat([df for _, df in generate(spec)[first:]], ignore_index=True)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_estimate_follows_covariate_drift_and_misses_concept_drift(seed: int) -> None:
    """A calibrated logistic regression fitted on drift-free days. The generator's label rule is a
    logistic in the observed features, so the model is well specified and covariate drift (inputs move,
    the rule stays) leaves it calibrated: the estimate lands within COVARIATE_TOLERANCE of what the real
    labels show. Concept drift (the rule changes, the inputs do not) leaves the probabilities, and so the
    estimate, exactly where they were, while the realized ROC AUC falls: the gap opens past the tolerance.
    (Accuracy at 0.5 does not fall under this generator's concept drift: positives get rarer, and a model
    predicting mostly "no" gains; see docs_snippets/performance_estimate.md.)"""
    ds = load_dataset(PROJECT / "configs" / "datasets" / "churn.yaml")
    base = GeneratorSpec(seed=seed, days=TRAIN_DAYS + WINDOW_DAYS, rows_per_day=ROWS_PER_DAY, drift_from_day=TRAIN_DAYS)
    train = pd.concat([df for _, df in generate(base)[:TRAIN_DAYS]], ignore_index=True)
    model = fit(build_pipeline("logistic_regression", {"C": 1.0}, ds, ImputationConfig(), seed), train, ds)

    def judged(drift: DriftSpec) -> tuple[Estimate, Performance]:
        frame = _window(base.model_copy(update={"drift": drift}), TRAIN_DAYS)
        p = predict_scores(model, frame, ds)
        return estimate_performance(p, n_boot=100, confidence=0.95, seed=seed), realized_performance(
            labels(frame, ds).to_numpy(), p
        )

    est_none, real_none = judged(DriftSpec())
    for strength in (0.5, 1.0):
        est, real = judged(DriftSpec(covariate=strength))
        err = estimate_error(est, real)
        assert err.roc_auc.abs_error <= COVARIATE_TOLERANCE, (strength, est, real)
        assert err.accuracy.abs_error <= COVARIATE_TOLERANCE, (strength, est, real)
        # not a constant that happens to be close: the drift moved accuracy a lot, and the estimate with it
        assert real_none.accuracy - real.accuracy > 0.05
        assert est_none.accuracy.value - est.accuracy.value > 0.05

    est_con, real_con = judged(DriftSpec(concept=1.0))
    assert est_con == est_none  # same inputs, same probabilities: the estimate cannot see the new rule
    assert real_con.roc_auc < real_none.roc_auc - 0.015
    err = estimate_error(est_con, real_con)
    assert err.roc_auc.error > COVARIATE_TOLERANCE, (est_con, real_con)
    assert not err.roc_auc.covered
