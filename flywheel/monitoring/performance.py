"""Performance without labels: estimate ROC AUC and accuracy from the served model's probabilities alone.

Labels arrive 30 days after a prediction; the model's own probabilities arrive with it. If the model
is calibrated (the calibration gate checks it at training), a probability p is the chance that the
row is positive, so the labels the rows will get can be treated as draws y_i ~ Bernoulli(p_i), and
every metric has an expected value under that assumption:

- accuracy at the decision threshold t = 0.5: expected TP = sum p [p >= t], FP = sum (1-p) [p >= t],
  TN = sum (1-p) [p < t], FN = sum p [p < t]; expected accuracy = (TP + TN) / n.
- ROC AUC: the chance that a random positive outranks a random negative, with each ordered pair of
  distinct rows (i, j) weighted by p_i (1 - p_j), the chance that i is the positive and j the negative
  (ties count one half): sum_{i != j} p_i (1-p_j) K(s_i, s_j) / sum_{i != j} p_i (1-p_j). Numerator and
  denominator are the exact expectations of the realized AUC's numerator and denominator (the
  denominator is E[n_pos n_neg]), so the estimate is their ratio; it is computed in O(n log n) from
  the sorted distinct probabilities, not over the n^2 pairs.
- the interval is Monte-Carlo: draw y ~ Bernoulli(p) `n_boot` times and take the quantiles of the
  realized metric. It is a prediction interval for what the realized labels of THESE rows will give
  (label noise, which dominates on a day's rows), still assuming calibration. It does not resample
  rows (the realized metric is measured on the same rows), nor does it widen for the model's own
  error (its probabilities are estimates of the true ones): on the project's generator, under
  covariate drift only, the nominal 95% interval held the realized value in 80% of 28,000-row
  windows and 83-90% of 7,000-row ones. Read it as a lower bound on the uncertainty.

What the estimate cannot see. It reads only the inputs' effect on the probabilities, never the
input->label rule: concept drift (P(y|x) changing) leaves the probabilities, hence the estimate,
where they were while the real metrics fall; only labels reveal it (`realized_performance`, and
`estimate_error` to track how far off the estimate was once outcomes arrive). Under covariate shift
(P(x) moving, P(y|x) fixed) the estimate follows the change in the metrics only as long as the
model stays calibrated on the new inputs: a model that is well specified for the rule keeps its
calibration when inputs move; a misspecified one extrapolating into new regions may not, and the
estimate then errs without saying so. Accuracy at 0.5 on a rare positive class mostly counts the
majority: a concept drift that lowers the positive rate can even raise realized accuracy while
ROC AUC falls (it does on the project's generator), so watch the AUC gap, not accuracy's.

Pure: numpy and the shared metrics (`flywheel.gates.roc_auc`, `flywheel.training.metric_value`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from flywheel.gates import roc_auc
from flywheel.training import metric_value

DECISION_THRESHOLD = 0.5  # the threshold accuracy (and f1) are measured at everywhere in the project
# How far the estimate may sit from the realized metric (ROC AUC or accuracy) on a window of at least
# TOLERANCE_MIN_ROWS rows when the drift is covariate only and the model stays calibrated. Measured on
# the project's generator (logistic regression fitted on 14 drift-free days of 2,000 rows, judged on the
# next 14 days: 28,000 rows; covariate drift 0, 0.25, 0.5, 0.75, 1; seeds 1..12, 60 windows): the
# largest |estimate - realized| was 0.012 for ROC AUC and 0.010 for accuracy; 0.02 leaves a margin of
# 0.008. Concept drift 1.0 on the same windows opened ROC AUC gaps of 0.022 .. 0.043 (every seed past
# 0.02, but only 8 of 12 past 0.03). On a week of the demo's traffic (7,000 rows) label noise alone
# moves the AUC error to 0.027 under covariate drift, and concept gaps spread 0.010 .. 0.055: judge
# smaller windows by the interval and by trends, not by this constant. Figures per seed in
# docs_snippets/performance_estimate.md; the check is tests/unit/test_performance.py.
COVARIATE_TOLERANCE = 0.02
TOLERANCE_MIN_ROWS = 28_000


@dataclass(frozen=True)
class MetricEstimate:
    """One metric's estimate and its Monte-Carlo interval at `Estimate.confidence`."""

    value: float
    lower: float
    upper: float


@dataclass(frozen=True)
class Estimate:
    """Estimated ROC AUC and accuracy of `n` rows from their probabilities alone."""

    roc_auc: MetricEstimate
    accuracy: MetricEstimate
    n: int
    expected_positive_rate: float  # mean probability: the positive rate the labels should show
    confidence: float
    n_boot: int
    threshold: float = DECISION_THRESHOLD

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Performance:
    """Realized metrics of `n` rows from their labels (ROC AUC is NaN when only one class is present)."""

    roc_auc: float
    accuracy: float
    n: int
    positive_rate: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class MetricError:
    """estimate - realized for one metric, and whether the realized value fell inside the interval."""

    error: float
    abs_error: float
    covered: bool


@dataclass(frozen=True)
class EstimateError:
    """The estimate's error on `n` rows once their labels arrived (NaN for an AUC the labels cannot give)."""

    roc_auc: MetricError
    accuracy: MetricError
    n: int

    @property
    def max_abs_error(self) -> float:
        """The larger of the two absolute errors, ignoring a NaN one (NaN only if both are)."""
        known = [e for e in (self.roc_auc.abs_error, self.accuracy.abs_error) if not np.isnan(e)]
        return max(known) if known else float("nan")

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "max_abs_error": self.max_abs_error}


# ---------------------------------------------------------------------------------------- estimates


def _check_probabilities(p: np.ndarray) -> np.ndarray:
    p = np.asarray(p, dtype=float).ravel()
    if p.size == 0:
        raise ValueError("no probabilities: cannot estimate performance of zero rows")
    if not np.all(np.isfinite(p)) or p.min() < 0.0 or p.max() > 1.0:
        bad = int(np.sum(~np.isfinite(p) | (p < 0) | (p > 1)))
        raise ValueError(f"{bad} of {p.size} probabilities are not finite numbers in [0, 1]")
    return p


def expected_accuracy(p: np.ndarray, threshold: float = DECISION_THRESHOLD) -> float:
    """(expected TP + expected TN) / n, taking each p as the chance the row is positive."""
    p = _check_probabilities(p)
    return float(np.mean(np.where(p >= threshold, p, 1.0 - p)))


def expected_roc_auc(p: np.ndarray) -> float:
    """sum_{i != j} p_i (1-p_j) K_ij / sum_{i != j} p_i (1-p_j), K_ij = 1 if p_i > p_j, 1/2 if equal.

    O(n log n): over the distinct values v_g (ascending) with counts c_g, P_g = c_g v_g is the
    expected positives at v_g and Q_g = c_g (1 - v_g) the expected negatives; positives at v_g outrank
    the negatives of every lower value, and tie with those at v_g other than themselves. NaN when the
    denominator is 0 (every p is 0, or every p is 1: no row can be the other class)."""
    p = _check_probabilities(p)
    values, counts = np.unique(p, return_counts=True)  # ascending
    pos = counts * values
    neg = counts * (1.0 - values)
    self_pairs = counts * values * (1.0 - values)  # i == j pairs, at every value
    neg_below = np.cumsum(neg) - neg
    numerator = np.sum(pos * neg_below) + 0.5 * np.sum(pos * neg - self_pairs)
    denominator = pos.sum() * neg.sum() - self_pairs.sum()
    if denominator <= 0:
        return float("nan")
    return float(numerator / denominator)


def estimate_performance(p: np.ndarray, n_boot: int, confidence: float, seed: int) -> Estimate:
    """Expected ROC AUC and accuracy (at 0.5) of rows scored `p`, with `confidence` Monte-Carlo
    intervals from `n_boot` label draws y ~ Bernoulli(p) (draws with a single class are left out
    of the AUC's interval). Assumes calibration: see the module's docstring for what that hides."""
    p = _check_probabilities(p)
    if n_boot < 1:
        raise ValueError(f"n_boot must be at least 1, got {n_boot}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    rng = np.random.default_rng(seed)
    aucs, accs = [], []
    for _ in range(n_boot):
        y = (rng.random(p.size) < p).astype(int)
        accs.append(metric_value("accuracy", y, p))
        if 0 < y.sum() < y.size:
            aucs.append(roc_auc(y, p))
    alpha = (1.0 - confidence) / 2.0
    return Estimate(
        roc_auc=MetricEstimate(expected_roc_auc(p), *_quantiles(aucs, alpha)),
        accuracy=MetricEstimate(expected_accuracy(p), *_quantiles(accs, alpha)),
        n=int(p.size),
        expected_positive_rate=float(p.mean()),
        confidence=confidence,
        n_boot=n_boot,
    )


def _quantiles(values: list[float], alpha: float) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    lo, hi = np.quantile(values, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


# ----------------------------------------------------------------------------------------- realized


def realized_performance(y: np.ndarray, p: np.ndarray) -> Performance:
    """ROC AUC and accuracy (at 0.5) of probabilities `p` against the 0/1 labels `y` that arrived."""
    y = np.asarray(y).ravel()
    p = _check_probabilities(p)
    if y.size != p.size:
        raise ValueError(f"{y.size} labels for {p.size} probabilities")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 0 or 1")
    y = y.astype(int)
    auc = roc_auc(y, p) if 0 < y.sum() < y.size else float("nan")
    return Performance(
        roc_auc=auc, accuracy=metric_value("accuracy", y, p), n=int(y.size), positive_rate=float(y.mean())
    )


def estimate_error(estimate: Estimate, realized: Performance) -> EstimateError:
    """How far the estimate was from what the labels showed (estimate - realized, per metric), and
    whether each realized value fell inside the estimate's interval. Both must describe the same rows."""
    if estimate.n != realized.n:
        raise ValueError(
            f"the estimate covers {estimate.n} rows, the realized metrics {realized.n}: estimate on the rows "
            "whose labels arrived before comparing"
        )

    def one(e: MetricEstimate, r: float) -> MetricError:
        err = e.value - r
        return MetricError(error=float(err), abs_error=float(abs(err)), covered=bool(e.lower <= r <= e.upper))

    return EstimateError(
        roc_auc=one(estimate.roc_auc, realized.roc_auc),
        accuracy=one(estimate.accuracy, realized.accuracy),
        n=estimate.n,
    )
