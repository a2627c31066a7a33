"""Per-feature drift of a window against the reference profile, with Evidently 0.7's choices and formulas.

Evidently (legacy/calculations/stattests/registry.py `_get_default_stattest`, checked in 0.7.23) drops
null and infinite values on both sides, then picks per column, where "values" counts the distinct values
of reference and current together and "rows" the reference's remaining values:
- reference > 1000 rows: numeric with > 5 values -> Wasserstein distance normed by the reference std
  (drift when >= 0.1); categorical, or numeric with <= 5 values -> Jensen-Shannon distance (>= 0.1);
- reference <= 1000 rows: numeric with > 5 values -> two-sample KS (drift when p <= 0.05); otherwise
  chi-square (p < 0.05), or the two-proportion Z-test (p < 0.05) when there are <= 2 values.
`auto` here makes the same choice from the profile; a column can name its own method and threshold
(`configs/monitoring.yaml`). `psi` is the project's PSI (`flywheel.stats`, the rollout guard's): bins at
the reference's deciles, not Evidently's PSI, whose bins span reference and current together.

The formulas are Evidently's: Jensen-Shannon over the shares of every value seen on either side (numeric
columns with > 20 reference values: Sturges bins over the joint range, as `get_binned_data`), natural
log; chi-square with the reference counts scaled to the window as expected counts; Wasserstein by scipy on
an exact profile. A quantile profile's Wasserstein distance integrates |F_ref - F_cur| with F_ref linear
between its quantile levels (within 0.001 of scipy's on the raw reference, see profile.py), and its KS
p-value is scipy's asymptotic one (what scipy itself uses once a sample exceeds 10,000).

Pure: the profile, a frame and arrays in, a result model out.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict

from flywheel.monitoring.config import DEFAULT_THRESHOLDS, P_VALUE_METHODS, ColumnMethod, DriftSettings
from flywheel.monitoring.profile import (
    CategoricalSummary,
    Distribution,
    MonitoringError,
    NumericSummary,
    ReferenceProfile,
    category_values,
    numeric_values,
)
from flywheel.stats import psi_bin_edges, psi_from_shares

SMALL_REFERENCE_ROWS = 1000  # at most this many reference values: Evidently's p-value tests
FEW_VALUES = 5  # numeric columns with at most this many values are compared as categories
BINNED_JS_VALUES = 20  # Jensen-Shannon on a numeric column bins it above this many reference values
EXACT_KS_MAX_ROWS = 10_000  # scipy's ks_2samp computes exact p-values up to here (larger: asymptotic)
PREDICTION = "prediction"  # the name prediction drift is reported under


class ColumnDrift(BaseModel):
    """One column's verdict: the method, its score (a distance, or a p-value) and the threshold."""

    model_config = ConfigDict(frozen=True)

    column: str
    kind: str  # numeric | categorical
    method: str
    threshold: float
    score: float | None  # None: not judged (see note)
    drifted: bool
    reference_count: int
    current_count: int
    note: str = ""

    @property
    def p_value(self) -> bool:
        return self.method in P_VALUE_METHODS

    @property
    def judged(self) -> bool:
        return self.score is not None


class DriftResult(BaseModel):
    model_config = ConfigDict(frozen=True)

    rows: int
    columns: list[ColumnDrift]
    prediction: ColumnDrift | None = None

    def column(self, name: str) -> ColumnDrift:
        return next(c for c in self.columns if c.column == name)


# ------------------------------------------------------------------------------------------ choice


def choose_method(kind: str, reference_count: int, distinct: int, choice: ColumnMethod) -> tuple[str, float]:
    """(method, threshold) for a column: `choice` when it names one, else Evidently 0.7's default for a
    column of `kind` with `reference_count` reference values and `distinct` values on both sides."""
    method = choice.method
    if method == "auto":
        continuous = kind == "numeric" and distinct > FEW_VALUES
        if reference_count > SMALL_REFERENCE_ROWS:
            method = "wasserstein" if continuous else "jensenshannon"
        else:
            method = "ks" if continuous else "chisquare" if distinct > 2 else "z"
    threshold = choice.threshold if choice.threshold is not None else DEFAULT_THRESHOLDS[method]
    return method, threshold


def is_drift(method: str, score: float, threshold: float) -> bool:
    """Evidently's comparison per method: KS p <= t; chi-square and Z p < t; distances >= t."""
    if method == "ks":
        return score <= threshold
    if method in P_VALUE_METHODS:
        return score < threshold
    return score >= threshold


# ------------------------------------------------------------------------------------------ numeric


def _wasserstein_quantile(dist: Distribution, cur: np.ndarray) -> float:
    """The integral of |F_ref - F_cur| with F_ref linear between knots and F_cur the window's step CDF."""
    b = np.unique(np.concatenate([dist.knots, cur]))
    if len(b) < 2:
        return 0.0
    a0, a1 = dist.right(b[:-1]), dist.left(b[1:])  # F_ref at the two ends of each interval (linear between)
    c = np.searchsorted(cur, b[:-1], "right") / len(cur)  # F_cur, constant on the interval
    length = np.diff(b)
    d0, d1 = a0 - c, a1 - c
    same_side = d0 * d1 >= 0
    crossing = length * (d0**2 + d1**2) / (2 * np.maximum(np.abs(d1 - d0), 1e-300))
    return float(np.sum(np.where(same_side, length * np.abs(d0 + d1) / 2, crossing)))


def _ks(dist: Distribution, cur: np.ndarray) -> float:
    """Two-sided two-sample KS p-value."""
    from scipy import stats

    if dist.exact and dist.n <= EXACT_KS_MAX_ROWS:
        return float(stats.ks_2samp(np.repeat(dist.knots, dist.counts), cur)[1])
    b = np.unique(np.concatenate([dist.knots, cur]))
    d_right = np.abs(dist.right(b) - np.searchsorted(cur, b, "right") / len(cur))
    d_left = np.abs(dist.left(b) - np.searchsorted(cur, b, "left") / len(cur))
    d = float(max(d_right.max(), d_left.max()))
    m, n = dist.n, len(cur)
    return float(np.clip(stats.distributions.kstwo.sf(d, np.round(m * n / (m + n))), 0, 1))


def _binned_shares(dist: Distribution, cur: np.ndarray, edges: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reference and window shares in np.histogram's bins (each half-open but the last)."""
    lefts = dist.left(edges)
    ref = np.diff(lefts)
    ref[-1] = dist.right(edges[-1:])[0] - lefts[-2]
    return ref, np.histogram(cur, edges)[0] / len(cur)


def _sturges_edges(lo: float, hi: float, n: int) -> np.ndarray:
    """np.histogram_bin_edges(sample, 'sturges') from the sample's range and size alone."""
    if hi <= lo:
        return np.array([lo - 0.5, hi + 0.5])
    width = (hi - lo) / (np.log2(n) + 1.0)
    return np.linspace(lo, hi, int(np.ceil((hi - lo) / width)) + 1)


def _numeric_score(method: str, s: NumericSummary, levels: list[float], cur: np.ndarray, psi_bins: int) -> float:
    from scipy import stats
    from scipy.spatial import distance

    dist = Distribution(s, levels)
    if method == "wasserstein":
        norm = max(float(s.std or 0.0), 0.001)
        if dist.exact:
            return float(stats.wasserstein_distance(dist.knots, cur, u_weights=dist.counts)) / norm
        return _wasserstein_quantile(dist, cur) / norm
    if method == "ks":
        return _ks(dist, cur)
    if method == "psi":
        edges = psi_bin_edges(dist.quantile(np.linspace(0, 1, psi_bins + 1)))
        return psi_from_shares(*_binned_shares(dist, cur, edges))
    if method == "jensenshannon" and not (dist.exact and s.unique <= BINNED_JS_VALUES):
        edges = _sturges_edges(min(float(s.min), cur[0]), max(float(s.max), cur[-1]), dist.n + len(cur))
        return float(distance.jensenshannon(*_binned_shares(dist, cur, edges)))
    # every value as a category: Jensen-Shannon, chi-square, Z
    keys, cur_counts = np.unique(cur, return_counts=True)
    return _category_score(method, dict(zip(dist.knots.tolist(), dist.counts.tolist(), strict=True)),
                           dict(zip(keys.tolist(), cur_counts.tolist(), strict=True)))


# ------------------------------------------------------------------------------------------ categories


def _category_score(method: str, ref: dict, cur: dict) -> float:
    """Jensen-Shannon, chi-square, Z or PSI over the union of the values seen on either side."""
    from scipy import stats
    from scipy.spatial import distance

    keys = sorted(set(ref) | set(cur), key=str)
    n_ref, n_cur = sum(ref.values()), sum(cur.values())
    r = np.array([ref.get(k, 0) for k in keys], float)
    c = np.array([cur.get(k, 0) for k in keys], float)
    if method == "jensenshannon":
        return float(distance.jensenshannon(r / n_ref, c / n_cur))
    if method == "psi":
        return psi_from_shares(r / n_ref, c / n_cur)
    if method == "chisquare":
        with np.errstate(divide="ignore", invalid="ignore"):
            return float(stats.chisquare(c, r * (n_cur / n_ref))[1])
    if method == "z":
        if len(ref) == 1 and len(cur) == 1 and set(ref) == set(cur):
            return 1.0
        p1, p2 = 1 - r[0] / n_ref, 1 - c[0] / n_cur  # share of values other than the first key
        pooled = (p1 * n_ref + p2 * n_cur) / (n_ref + n_cur)
        z = (p1 - p2) / np.sqrt(pooled * (1 - pooled) * (1 / n_ref + 1 / n_cur))
        return float(2 * (1 - stats.norm.cdf(abs(z))))
    raise MonitoringError(f"method {method!r} does not apply to categories")


def _categorical_counts(s: CategoricalSummary, values: pd.Series) -> tuple[dict, dict]:
    ref = dict(s.categories)
    cur = values.value_counts().to_dict()
    if s.other:  # categories the profile folded: the window's values outside the kept ones join them
        ref["(other)"] = s.other
        outside = [k for k in cur if k not in ref]
        cur["(other)"] = sum(cur.pop(k) for k in outside)
    return ref, cur


# ------------------------------------------------------------------------------------------ columns


def _skipped(name: str, kind: str, choice: ColumnMethod, ref_count: int, cur_count: int, note: str) -> ColumnDrift:
    method = choice.method if choice.method != "auto" else "none"
    threshold = choice.threshold if choice.threshold is not None else DEFAULT_THRESHOLDS.get(method, 0.0)
    return ColumnDrift(column=name, kind=kind, method=method, threshold=threshold, score=None, drifted=False,
                       reference_count=ref_count, current_count=cur_count, note=note)


def numeric_drift(name: str, s: NumericSummary, levels: list[float], values: np.ndarray, choice: ColumnMethod,
                  psi_bins: int = 10) -> ColumnDrift:
    """One numeric column's verdict (`values`: the window's column as float64 with NaN for missing)."""
    cur = np.sort(values[np.isfinite(values)])
    if not s.count:
        return _skipped(name, "numeric", choice, 0, len(cur), "no finite values in the reference")
    if not len(cur):
        return _skipped(name, "numeric", choice, s.count, 0, "no values in the window")
    distinct = len(np.union1d(s.values, np.unique(cur))) if s.exact else s.unique
    method, threshold = choose_method("numeric", s.count, distinct, choice)
    score = _numeric_score(method, s, levels, cur, psi_bins)
    return ColumnDrift(column=name, kind="numeric", method=method, threshold=threshold, score=score,
                       drifted=is_drift(method, score, threshold), reference_count=s.count, current_count=len(cur))


def categorical_drift(name: str, s: CategoricalSummary, column: pd.Series, choice: ColumnMethod) -> ColumnDrift:
    """One categorical column's verdict."""
    values = category_values(column)
    if not s.count:
        return _skipped(name, "categorical", choice, 0, len(values), "no values in the reference")
    if not len(values):
        return _skipped(name, "categorical", choice, s.count, 0, "no values in the window")
    ref, cur = _categorical_counts(s, values)
    method, threshold = choose_method("categorical", s.count, len(set(ref) | set(cur)), choice)
    score = _category_score(method, ref, cur)
    return ColumnDrift(column=name, kind="categorical", method=method, threshold=threshold, score=score,
                       drifted=is_drift(method, score, threshold), reference_count=s.count,
                       current_count=len(values))


def drift_from_profile(profile: ReferenceProfile, window: pd.DataFrame, settings: DriftSettings,
                       predictions: np.ndarray | None = None) -> DriftResult:
    """Every feature's verdict, and the prediction's when both the profile and `predictions` have one.

    A feature missing from the window, or numeric in the profile but not in the window, is reported
    unjudged (score None, with a note): the data-quality verdict is where that counts."""
    columns = []
    for name, s in profile.features.items():
        kind = s.kind
        choice = settings.columns.get(name) or (settings.numeric if kind == "numeric" else settings.categorical)
        if name not in window.columns:
            columns.append(_skipped(name, kind, choice, s.count, 0, "column missing from the window"))
        elif isinstance(s, NumericSummary):
            try:
                values = numeric_values(window[name], f"window column {name!r}")
            except MonitoringError as exc:
                columns.append(_skipped(name, kind, choice, s.count, 0, str(exc)))
                continue
            columns.append(numeric_drift(name, s, profile.quantile_levels, values, choice, settings.psi_bins))
        else:
            columns.append(categorical_drift(name, s, window[name], choice))
    prediction = None
    if profile.prediction is not None and predictions is not None:
        prediction = numeric_drift(PREDICTION, profile.prediction, profile.quantile_levels,
                                   np.asarray(predictions, float), settings.prediction, settings.psi_bins)
    return DriftResult(rows=len(window), columns=columns, prediction=prediction)
