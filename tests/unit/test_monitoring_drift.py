"""Drift from the profile (flywheel/monitoring/drift.py): Evidently 0.7's method choice and formulas,
checked against scipy on the raw samples the profile was built from (Evidently itself: integration)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from scipy.spatial import distance

from flywheel.monitoring.config import ColumnMethod, DriftSettings
from flywheel.monitoring.drift import (
    categorical_drift,
    choose_method,
    drift_from_profile,
    is_drift,
    numeric_drift,
)
from flywheel.monitoring.profile import QUANTILE_LEVELS, profile_frame, summarize_categorical, summarize_numeric
from flywheel.schemas import DatasetDefinition, FeatureSpec
from flywheel.stats import psi

AUTO = ColumnMethod()
LEVELS = QUANTILE_LEVELS.tolist()
WASSERSTEIN_BAND = 0.002  # a quantile profile's Wasserstein distance vs scipy's on the raw reference


def _num(ref: np.ndarray, cur: np.ndarray, choice: ColumnMethod = AUTO, bins: int = 10):
    return numeric_drift("x", summarize_numeric(ref), LEVELS, np.asarray(cur, float), choice, bins)


def _cat(ref: list, cur: list, choice: ColumnMethod = AUTO):
    return categorical_drift("c", summarize_categorical(pd.Series(ref)), pd.Series(cur), choice)


# ------------------------------------------------------------------------------------ the choice


@pytest.mark.parametrize(("kind", "rows", "distinct", "method"), [
    ("numeric", 1001, 6, "wasserstein"),
    ("numeric", 1001, 5, "jensenshannon"),
    ("categorical", 1001, 40, "jensenshannon"),
    ("numeric", 1000, 6, "ks"),
    ("numeric", 1000, 5, "chisquare"),
    ("numeric", 1000, 2, "z"),
    ("categorical", 1000, 3, "chisquare"),
    ("categorical", 1000, 2, "z"),
])
def test_auto_makes_evidentlys_choice(kind: str, rows: int, distinct: int, method: str) -> None:
    assert choose_method(kind, rows, distinct, AUTO)[0] == method


def test_thresholds_default_per_method_and_can_be_overridden() -> None:
    assert choose_method("numeric", 5000, 50, AUTO) == ("wasserstein", 0.1)
    assert choose_method("numeric", 500, 50, AUTO) == ("ks", 0.05)
    assert choose_method("numeric", 5000, 50, ColumnMethod(method="psi")) == ("psi", 0.1)
    assert choose_method("numeric", 5000, 50, ColumnMethod(threshold=0.2)) == ("wasserstein", 0.2)


def test_drift_comparisons_at_the_threshold_follow_evidently() -> None:
    assert is_drift("ks", 0.05, 0.05), "KS: p <= threshold"
    assert not is_drift("chisquare", 0.05, 0.05) and not is_drift("z", 0.05, 0.05), "chi-square, Z: p < threshold"
    assert is_drift("wasserstein", 0.1, 0.1) and is_drift("jensenshannon", 0.1, 0.1) and is_drift("psi", 0.1, 0.1)


def test_values_counted_on_both_sides_decide_between_the_methods() -> None:
    rng = np.random.default_rng(0)
    ref = rng.integers(0, 5, 2000).astype(float)  # 5 values
    assert _num(ref, rng.integers(0, 5, 500)).method == "jensenshannon"
    assert _num(ref, rng.integers(0, 6, 500)).method == "wasserstein", "a 6th value in the window makes it numeric"


# ------------------------------------------------------------------------------------ the scores


def test_wasserstein_of_an_exact_profile_equals_scipys() -> None:
    rng = np.random.default_rng(1)
    ref, cur = rng.poisson(3, 5000).astype(float), rng.poisson(3.5, 800).astype(float)
    r = _num(ref, cur)
    assert r.method == "wasserstein"
    assert r.score == pytest.approx(stats.wasserstein_distance(ref, cur) / ref.std(), rel=1e-9)


@pytest.mark.parametrize("draw", [
    lambda rng, n, s: rng.normal(s, 1, n),
    lambda rng, n, s: rng.lognormal(4.2 + 0.45 * s, 0.45, n),
    lambda rng, n, s: rng.gamma(2, 18, n) * (1 + s),
    lambda rng, n, s: np.where(rng.random(n) < 0.3, 0.0, rng.normal(5 + s, 2, n)),  # point mass + spread
])
@pytest.mark.parametrize("shift", [0.0, 0.1, 0.3])
def test_wasserstein_of_a_quantile_profile_is_within_the_band(draw, shift: float) -> None:
    rng = np.random.default_rng(2)
    ref, cur = draw(rng, 30_000, 0.0), draw(rng, 3000, shift)
    r = _num(ref, cur)
    assert not summarize_numeric(ref).exact
    want = stats.wasserstein_distance(ref, cur) / ref.std()
    assert abs(r.score - want) < WASSERSTEIN_BAND, f"{r.score} vs scipy {want}"


def test_wasserstein_drops_missing_and_infinite_values_on_both_sides() -> None:
    rng = np.random.default_rng(3)
    ref, cur = rng.poisson(3, 3000).astype(float), rng.poisson(3, 500).astype(float)
    clean = _num(ref, cur).score
    dirty = _num(np.concatenate([ref, [np.nan, np.inf]]), np.concatenate([cur, [np.nan, -np.inf]]))
    assert dirty.score == pytest.approx(clean) and dirty.current_count == 500 and dirty.reference_count == 3000


def test_jensen_shannon_of_categories_uses_the_shares_of_every_value_seen() -> None:
    ref = ["a"] * 900 + ["b"] * 600 + [None] * 10
    cur = ["a"] * 100 + ["b"] * 80 + ["new"] * 20
    r = _cat(ref, cur)
    assert r.method == "jensenshannon" and r.reference_count == 1500 and r.current_count == 200
    want = distance.jensenshannon([900 / 1500, 600 / 1500, 0], [100 / 200, 80 / 200, 20 / 200])
    assert r.score == pytest.approx(want) and r.drifted == (want >= 0.1)


def test_binned_jensen_shannon_on_a_numeric_column_uses_sturges_bins_over_both_sides() -> None:
    rng = np.random.default_rng(4)
    ref, cur = rng.normal(0, 1, 4000), rng.normal(0.2, 1, 1000)
    r = _num(ref, cur, ColumnMethod(method="jensenshannon"))
    edges = np.histogram_bin_edges(np.concatenate([ref, cur]), bins="sturges")
    want = distance.jensenshannon(np.histogram(ref, edges)[0] / len(ref), np.histogram(cur, edges)[0] / len(cur))
    assert r.score == pytest.approx(want, abs=0.005), "quantile profile: the reference bins are interpolated"


def test_small_reference_ks_equals_scipys() -> None:
    rng = np.random.default_rng(5)
    ref, cur = rng.normal(0, 1, 800), rng.normal(0.15, 1, 600)
    r = _num(ref, cur)
    assert r.method == "ks" and r.score == pytest.approx(stats.ks_2samp(ref, cur).pvalue, rel=1e-12)
    assert r.drifted == (r.score <= 0.05)


def test_large_reference_ks_when_asked_is_the_asymptotic_p_value() -> None:
    rng = np.random.default_rng(6)
    ref, cur = rng.normal(0, 1, 40_000), rng.normal(0.05, 1, 3000)
    r = _num(ref, cur, ColumnMethod(method="ks"))
    assert r.score == pytest.approx(stats.ks_2samp(ref, cur, method="asymp").pvalue, rel=0.05)


def test_small_reference_chi_square_and_z_test() -> None:
    ref = ["a"] * 500 + ["b"] * 300 + ["c"] * 200
    cur = ["a"] * 40 + ["b"] * 40 + ["c"] * 20
    r = _cat(ref, cur)
    assert r.method == "chisquare"
    assert r.score == pytest.approx(stats.chisquare([40, 40, 20], [50, 30, 20]).pvalue)
    z = _cat(["x"] * 700 + ["y"] * 300, ["x"] * 50 + ["y"] * 50)
    p1, p2, pooled = 0.3, 0.5, (300 + 50) / 1100
    want = 2 * (1 - stats.norm.cdf(abs((p1 - p2) / np.sqrt(pooled * (1 - pooled) * (1 / 1000 + 1 / 100)))))
    assert z.method == "z" and z.score == pytest.approx(want) and z.drifted
    assert _cat(["x"] * 10, ["x"] * 5).score == 1.0, "one and the same value on both sides"


def test_psi_from_the_profile_is_the_rollout_guards_psi() -> None:
    rng = np.random.default_rng(7)
    ref, cur = rng.poisson(4, 5000).astype(float), rng.poisson(4.4, 1000).astype(float)
    r = _num(ref, cur, ColumnMethod(method="psi"))
    assert r.method == "psi" and r.score == pytest.approx(psi(ref, cur, 10), rel=1e-9), "exact profile: identical"
    ref, cur = rng.normal(0, 1, 50_000), rng.normal(0.3, 1, 5000)
    assert _num(ref, cur, ColumnMethod(method="psi")).score == pytest.approx(psi(ref, cur, 10), abs=0.002)


def test_psi_of_categories() -> None:
    r = _cat(["a"] * 500 + ["b"] * 500, ["a"] * 700 + ["b"] * 300, ColumnMethod(method="psi", threshold=0.2))
    assert r.method == "psi" and r.threshold == 0.2
    assert r.score == pytest.approx((0.7 - 0.5) * np.log(0.7001 / 0.5001) + (0.3 - 0.5) * np.log(0.3001 / 0.5001))


# ------------------------------------------------------------------------------------ the frame


def _profile(n: int = 3000):
    rng = np.random.default_rng(8)
    ds = DatasetDefinition(name="toy", source="x", entity="id", timestamp="ts", label="y", features=[
        FeatureSpec(name="x", type="float"), FeatureSpec(name="c", type="category")])
    frame = pd.DataFrame({"x": rng.normal(0, 1, n), "c": rng.choice(["a", "b"], n)})
    return profile_frame(frame, ds, predictions=rng.beta(2, 5, n)), rng


def test_drift_from_profile_judges_every_feature_and_the_prediction() -> None:
    p, rng = _profile()
    window = pd.DataFrame({"x": rng.normal(0.5, 1, 600), "c": rng.choice(["a", "b"], 600)})
    r = drift_from_profile(p, window, DriftSettings(), predictions=rng.beta(2, 5, 600))
    assert [c.column for c in r.columns] == ["x", "c"] and r.rows == 600
    assert r.column("x").drifted and not r.column("c").drifted
    assert r.prediction is not None and r.prediction.column == "prediction" and not r.prediction.drifted
    shifted = drift_from_profile(p, window, DriftSettings(), predictions=rng.beta(5, 2, 600))
    assert shifted.prediction.drifted
    assert drift_from_profile(p, window, DriftSettings()).prediction is None, "no predictions: not judged"


def test_per_column_settings_override_the_type_defaults() -> None:
    p, rng = _profile()
    window = pd.DataFrame({"x": rng.normal(0.3, 1, 600), "c": rng.choice(["a", "b"], 600)})
    settings = DriftSettings(columns={"x": ColumnMethod(method="psi")}, categorical=ColumnMethod(threshold=0.5))
    r = drift_from_profile(p, window, settings)
    assert r.column("x").method == "psi" and not r.column("x").drifted, "PSI does not see a 0.3 sigma shift"
    assert (r.column("c").method, r.column("c").threshold) == ("jensenshannon", 0.5)


def test_columns_that_cannot_be_judged_say_why_and_never_drift() -> None:
    p, _ = _profile()
    r = drift_from_profile(p, pd.DataFrame({"x": ["one", "two"]}), DriftSettings())
    assert not r.column("x").judged and "not numeric" in r.column("x").note and not r.column("x").drifted
    assert r.column("c").note == "column missing from the window" and r.column("c").score is None
    empty = drift_from_profile(p, pd.DataFrame({"x": [np.nan, np.inf], "c": [None, None]}), DriftSettings())
    assert [c.note for c in empty.columns] == ["no values in the window"] * 2
