"""The reference profile: what monitoring knows about the training set, so it never reads it again.

Built once at training time (tasks/monitor.py `profile_reference`) from the rows the model was fitted on,
stored with the training run as `monitoring/reference_profile.json`, and read from the model version.

Per numeric feature (int, float and bool features): row, missing and non-finite counts, mean and
standard deviation (ddof 0, as Evidently norms the Wasserstein distance), min/max, the number of distinct
values, a 20-bin histogram, the dataset's declared min/max, and the distribution itself in one of two forms:
- exact: every distinct value with its count, when there are at most `EXACT_MAX_VALUES` (1,000) of them.
  Integer counts, small references (<= 1,000 rows: where Evidently's KS and chi-square tests need the sample)
  and flags are all exact, so every statistic on them equals Evidently's to rounding;
- quantiles: the values at `QUANTILE_LEVELS`, 1,001 evenly spaced levels (0, 0.001, ..., 1) plus 36 levels
  in each tail (1e-7 ... 9e-4 and their mirrors). Between two levels the reference CDF is taken as linear.
  Measured against scipy on the raw samples (normal, lognormal, gamma, point mass + normal; 5k-1M rows),
  the Wasserstein distance normed by the std is reproduced within 0.001; without the tail levels a
  1M-row lognormal was off by 0.003 (its top 0.1% spans many standard deviations).
Per categorical feature: the count of each category (the `MAX_CATEGORIES` most frequent; the rest folded into
`other`), missing count, the dataset's allowed values. Plus the model's P(positive) on the same rows, as a
numeric summary.

Pure: frames and arrays in, a pydantic model out; `to_json` / `from_json` are the only serialisation.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from flywheel.errors import FlywheelError
from flywheel.schemas import DatasetDefinition

PROFILE_FORMAT = "flywheel.reference_profile/1"
PROFILE_ARTIFACT = "monitoring/reference_profile.json"  # in the training run's artifacts
EXACT_MAX_VALUES = 1000
MAX_CATEGORIES = 10_000
HISTOGRAM_BINS = 20
_TAIL = np.array([j * 10.0**-k for k in range(4, 8) for j in range(1, 10)])
QUANTILE_LEVELS: np.ndarray = np.unique(np.concatenate([np.linspace(0, 1, 1001), _TAIL, 1 - _TAIL]))


class MonitoringError(FlywheelError):
    """Monitoring cannot judge a window: no profile, an unreadable profile, a window without its columns."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NumericSummary(_Strict):
    kind: Literal["numeric"] = "numeric"
    rows: int = Field(ge=0)
    missing: int = Field(ge=0)  # null values
    non_finite: int = Field(0, ge=0)  # +-inf: left out of every statistic, as Evidently drops them
    count: int = Field(ge=0)  # finite values: what the statistics describe
    mean: float | None = None
    std: float | None = None  # population std (ddof 0)
    min: float | None = None
    max: float | None = None
    unique: int = Field(0, ge=0)
    values: list[float] | None = None  # exact form: the distinct values, ascending ...
    counts: list[int] | None = None  # ... and how often each occurs
    quantiles: list[float] | None = None  # quantile form: the values at the profile's quantile levels
    histogram_edges: list[float] = []
    histogram_counts: list[int] = []
    declared_min: float | None = None  # the dataset definition's range (data-quality checks)
    declared_max: float | None = None

    @model_validator(mode="after")
    def _one_form(self) -> NumericSummary:
        if self.count and (self.values is None) == (self.quantiles is None):
            raise ValueError("a numeric summary with values holds exactly one of values/counts or quantiles")
        if self.values is not None:
            if self.counts is None or len(self.counts) != len(self.values):
                raise ValueError("values and counts must have the same length")
            if sum(self.counts) != self.count:
                raise ValueError(f"counts sum to {sum(self.counts)}, not count {self.count}")
            if any(b <= a for a, b in zip(self.values, self.values[1:], strict=False)):
                raise ValueError("values must be strictly increasing")
        return self

    @property
    def exact(self) -> bool:
        return self.values is not None

    @property
    def missing_share(self) -> float:
        return self.missing / self.rows if self.rows else 0.0


class CategoricalSummary(_Strict):
    kind: Literal["categorical"] = "categorical"
    rows: int = Field(ge=0)
    missing: int = Field(ge=0)
    count: int = Field(ge=0)  # non-null values
    categories: dict[str, int] = {}  # category (as text) -> count, most frequent first
    other: int = Field(0, ge=0)  # values of the categories beyond MAX_CATEGORIES, folded together
    allowed: list[str] | None = None  # the dataset definition's domain

    @property
    def missing_share(self) -> float:
        return self.missing / self.rows if self.rows else 0.0


Summary = Annotated[NumericSummary | CategoricalSummary, Field(discriminator="kind")]


class ReferenceProfile(_Strict):
    format: Literal["flywheel.reference_profile/1"] = PROFILE_FORMAT
    dataset: str
    rows: int = Field(ge=0)
    created_at: datetime
    start: datetime | None = None  # the reference's event-time range
    end: datetime | None = None
    quantile_levels: list[float]
    features: dict[str, Summary]
    prediction: NumericSummary | None = None  # the model's P(positive) on the same rows

    @model_validator(mode="after")
    def _quantiles_match_levels(self) -> ReferenceProfile:
        n = len(self.quantile_levels)
        for name, s in [*self.features.items(), ("prediction", self.prediction)]:
            if isinstance(s, NumericSummary) and s.quantiles is not None and len(s.quantiles) != n:
                raise ValueError(f"{name}: {len(s.quantiles)} quantiles for {n} quantile levels")
        return self

    @property
    def numeric_features(self) -> list[str]:
        return [n for n, s in self.features.items() if s.kind == "numeric"]

    @property
    def categorical_features(self) -> list[str]:
        return [n for n, s in self.features.items() if s.kind == "categorical"]

    def to_json(self) -> str:
        return self.model_dump_json()

    @classmethod
    def from_json(cls, text: str, source: str = "profile") -> ReferenceProfile:
        """Parse a stored profile; MonitoringError naming `source` and the first problems otherwise."""
        try:
            return cls.model_validate_json(text)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:3])
            raise MonitoringError(f"{source} is not a reference profile ({PROFILE_FORMAT}): {problems}") from None


# ----------------------------------------------------------------------------------------- building


def numeric_values(series: pd.Series, what: str) -> np.ndarray:
    """A column as float64 with NaN for missing (bools as 0/1); MonitoringError if it is not numeric."""
    if pd.api.types.is_bool_dtype(series):
        return series.astype("float64").to_numpy()
    if pd.api.types.is_numeric_dtype(series):
        return series.to_numpy(dtype="float64", na_value=np.nan)
    try:
        return pd.to_numeric(series, errors="raise").to_numpy(dtype="float64", na_value=np.nan)
    except (ValueError, TypeError):
        sample = series.dropna().astype(str).head(3).tolist()
        raise MonitoringError(f"{what} is not numeric (values such as {sample})") from None


def category_values(series: pd.Series) -> pd.Series:
    """Non-null values of a categorical column, as text (the profile keys categories by their text)."""
    return series.dropna().astype(str)


def _sorted_quantiles(x: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """np.quantile(x, levels) ('linear') of an already sorted array, without sorting it again."""
    pos = levels * (len(x) - 1)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, len(x) - 1)
    return x[lo] + (pos - lo) * (x[hi] - x[lo])


def summarize_numeric(values: np.ndarray, declared_min: float | None = None,
                      declared_max: float | None = None) -> NumericSummary:
    """The numeric summary of one column (float64 with NaN for missing)."""
    v = np.asarray(values, dtype="float64")
    nan = np.isnan(v)
    finite = v[np.isfinite(v)]
    base: dict[str, Any] = {"rows": len(v), "missing": int(nan.sum()), "non_finite": int((~nan).sum() - len(finite)),
                            "count": len(finite), "declared_min": declared_min, "declared_max": declared_max}
    if not len(finite):
        return NumericSummary(**base)
    x = np.sort(finite)
    distinct = np.flatnonzero(np.diff(x)) + 1  # where a new value starts
    unique = len(distinct) + 1
    edges = np.histogram_bin_edges(x, bins=HISTOGRAM_BINS)
    hist = np.histogram(x, edges)[0]
    form: dict[str, Any]
    if unique <= EXACT_MAX_VALUES:
        starts = np.concatenate([[0], distinct])
        counts = np.diff(np.concatenate([starts, [len(x)]]))
        form = {"values": x[starts].tolist(), "counts": counts.tolist()}
    else:
        form = {"quantiles": _sorted_quantiles(x, QUANTILE_LEVELS).tolist()}
    return NumericSummary(**base, mean=float(x.mean()), std=float(x.std()), min=float(x[0]), max=float(x[-1]),
                          unique=unique, histogram_edges=edges.tolist(), histogram_counts=hist.tolist(), **form)


def summarize_categorical(series: pd.Series, allowed: list[str] | None = None) -> CategoricalSummary:
    """The categorical summary of one column (categories keyed by their text)."""
    values = category_values(series)
    counts = values.value_counts()
    counts = counts.iloc[np.lexsort((counts.index.to_numpy(str), -counts.to_numpy()))]  # by count, then name
    kept = counts.iloc[:MAX_CATEGORIES]
    return CategoricalSummary(rows=len(series), missing=len(series) - len(values), count=len(values),
                              categories={str(k): int(c) for k, c in kept.items()},
                              other=int(counts.iloc[MAX_CATEGORIES:].sum()), allowed=allowed)


def profile_frame(frame: pd.DataFrame, dataset: DatasetDefinition, predictions: np.ndarray | None = None,
                  created_at: datetime | None = None) -> ReferenceProfile:
    """The reference profile of `frame` (the training rows) for `dataset`'s features, with the model's
    P(positive) on the same rows when `predictions` is given."""
    missing = [f for f in dataset.feature_names if f not in frame.columns]
    if missing:
        raise MonitoringError(f"the reference data lacks feature columns {missing} of dataset {dataset.name!r}")
    if predictions is not None and len(predictions) != len(frame):
        raise MonitoringError(f"{len(predictions)} predictions for {len(frame)} reference rows")
    features: dict[str, NumericSummary | CategoricalSummary] = {}
    for f in dataset.features:
        if f.is_numeric:
            features[f.name] = summarize_numeric(numeric_values(frame[f.name], f"reference column {f.name!r}"),
                                                 f.min, f.max)
        else:
            features[f.name] = summarize_categorical(frame[f.name], f.allowed)
    start = end = None
    if dataset.timestamp in frame.columns and len(frame):
        ts = pd.to_datetime(frame[dataset.timestamp], utc=True)
        start, end = ts.min().to_pydatetime(), ts.max().to_pydatetime()
    # created_at is metadata (wall time): the profile's own span is start/end, from the frame's event times
    return ReferenceProfile(
        dataset=dataset.name, rows=len(frame), created_at=created_at or datetime.now(UTC), start=start, end=end,
        quantile_levels=QUANTILE_LEVELS.tolist(), features=features,
        prediction=None if predictions is None else summarize_numeric(np.asarray(predictions, float), 0.0, 1.0),
    )


# ------------------------------------------------------------------------------ the distribution


class Distribution:
    """The reference distribution of one numeric summary: its CDF (right-continuous and left limits), its
    quantile function and the points where either changes slope. Exact summaries are step functions; a
    quantile summary's CDF is linear between the quantile levels (steps where quantiles repeat)."""

    def __init__(self, summary: NumericSummary, levels: list[float] | np.ndarray) -> None:
        if not summary.count:
            raise MonitoringError("the reference has no finite values")
        self.n = summary.count
        self.exact = summary.exact
        if summary.exact:
            self.knots = np.asarray(summary.values, float)
            self.counts = np.asarray(summary.counts, np.int64)
            self._cum = np.concatenate([[0], np.cumsum(self.counts)]) / self.n  # P(X < knot_i) = _cum[i]
        else:
            self.knots = np.asarray(summary.quantiles, float)
            self.levels = np.asarray(levels, float)

    def _linear(self, j: np.ndarray, t: np.ndarray) -> np.ndarray:
        m = len(self.knots) - 1
        out = np.where(j < 0, 0.0, 1.0)
        mid = (j >= 0) & (j < m)
        jm = j[mid]
        x0, x1 = self.knots[jm], self.knots[jm + 1]
        out[mid] = self.levels[jm] + (t[mid] - x0) / (x1 - x0) * (self.levels[jm + 1] - self.levels[jm])
        return out

    def right(self, t: np.ndarray) -> np.ndarray:
        """P(X <= t)."""
        t = np.asarray(t, float)
        j = np.searchsorted(self.knots, t, "right")
        return self._cum[j] if self.exact else self._linear(j - 1, t)

    def left(self, t: np.ndarray) -> np.ndarray:
        """P(X < t)."""
        t = np.asarray(t, float)
        j = np.searchsorted(self.knots, t, "left")
        return self._cum[j] if self.exact else self._linear(j - 1, t)

    def quantile(self, u: np.ndarray) -> np.ndarray:
        """The reference's quantiles at `u` ('linear', as np.quantile on the reference sample)."""
        u = np.asarray(u, float)
        if not self.exact:
            return np.interp(u, self.levels, self.knots)
        pos = u * (self.n - 1)
        lo = np.floor(pos).astype(np.int64)
        hi = np.minimum(lo + 1, self.n - 1)
        cum = np.cumsum(self.counts)
        xlo = self.knots[np.searchsorted(cum, lo, "right")]
        xhi = self.knots[np.searchsorted(cum, hi, "right")]
        return xlo + (pos - lo) * (xhi - xlo)

    def sample(self, rows: int) -> np.ndarray:
        """`rows` values that reproduce the distribution (stratified: the quantiles at (i + 0.5) / rows);
        an exact reference of at most `rows` values gives back exactly its values."""
        if self.exact and self.n <= rows:
            return np.repeat(self.knots, self.counts)
        if self.exact:
            return np.repeat(self.knots, _allocate(self.counts, rows))
        return self.quantile((np.arange(rows) + 0.5) / rows)


def reference_sample(profile: ReferenceProfile, rows: int, seed: int = 0) -> pd.DataFrame:
    """A frame rebuilt from the profile alone, for the human report (the drift verdicts never use it).

    min(`rows`, the reference's rows) rows; each column keeps its share of values (missing and non-finite
    values become NaN / None). A column held exactly whose values fit gives back exactly the reference's
    values (a reference of <= `rows` rows is reproduced column by column); otherwise the quantiles at
    (i + 0.5) / n. Marginals only: columns are shuffled independently, so correlations between them mean nothing.
    """
    rng = np.random.default_rng(seed)
    rows = min(rows, profile.rows)
    scale = rows / profile.rows if profile.rows else 0.0
    out: dict[str, Any] = {}
    for name, s in profile.features.items():
        n_values = min(rows, round(s.count * scale))
        if isinstance(s, NumericSummary):
            body = Distribution(s, profile.quantile_levels).sample(n_values) if n_values else np.array([])
            col: np.ndarray = np.concatenate([body, np.full(rows - len(body), np.nan)])
        else:
            keys = np.array([*s.categories, *(["(other)"] if s.other else [])], dtype=object)
            counts = np.array([*s.categories.values(), *([s.other] if s.other else [])], float)
            alloc = _allocate(counts, n_values) if len(counts) else np.zeros(0, np.int64)
            col = np.concatenate([np.repeat(keys, alloc), np.full(rows - alloc.sum(), None, dtype=object)])
        out[name] = rng.permutation(col)
    return pd.DataFrame(out)


def _allocate(counts: np.ndarray, total: int) -> np.ndarray:
    """`total` split in proportion to `counts` (largest remainders): integers summing to `total`."""
    share = np.asarray(counts, float) / np.sum(counts) * total
    alloc = np.floor(share).astype(np.int64)
    alloc[np.argsort(alloc - share, kind="stable")[: total - alloc.sum()]] += 1
    return alloc
