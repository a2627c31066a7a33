"""The reference profile (flywheel/monitoring/profile.py) on tiny in-memory frames."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from flywheel.monitoring import profile as prof
from flywheel.monitoring.profile import (
    QUANTILE_LEVELS,
    Distribution,
    MonitoringError,
    ReferenceProfile,
    profile_frame,
    reference_sample,
    summarize_categorical,
    summarize_numeric,
)
from flywheel.schemas import DatasetDefinition, FeatureSpec


def _dataset(*features: tuple[str, str]) -> DatasetDefinition:
    return DatasetDefinition(name="toy", source="x", entity="id", timestamp="ts", label="y",
                             features=[FeatureSpec(name=n, type=t, min=0, max=100) if t != "category"
                                       else FeatureSpec(name=n, type=t, allowed=["a", "b", "c"]) for n, t in features])


def test_numeric_summary_holds_counts_moments_and_exact_values() -> None:
    s = summarize_numeric(np.array([3.0, 1.0, 1.0, np.nan, np.inf, 2.0]), declared_min=0, declared_max=10)
    assert (s.rows, s.missing, s.non_finite, s.count, s.unique) == (6, 1, 1, 4, 3)
    assert s.exact and s.values == [1.0, 2.0, 3.0] and s.counts == [2, 1, 1] and s.quantiles is None
    assert s.mean == pytest.approx(1.75) and s.std == pytest.approx(np.std([3, 1, 1, 2]))  # ddof 0, as Evidently
    assert (s.min, s.max, s.declared_min, s.declared_max) == (1.0, 3.0, 0, 10)
    assert s.missing_share == pytest.approx(1 / 6)
    assert sum(s.histogram_counts) == 4 and len(s.histogram_edges) == prof.HISTOGRAM_BINS + 1


def test_many_distinct_values_are_kept_as_quantiles_on_the_fixed_grid() -> None:
    x = np.random.default_rng(0).lognormal(0, 1, 5000)
    s = summarize_numeric(x)
    assert not s.exact and s.values is None and s.unique == 5000
    assert len(QUANTILE_LEVELS) == len(s.quantiles) > 1001, "1,001 even levels plus the tail levels"
    assert np.allclose(s.quantiles, np.quantile(x, QUANTILE_LEVELS), rtol=0, atol=1e-12)


def test_a_column_with_nothing_but_missing_values_has_counts_only() -> None:
    s = summarize_numeric(np.array([np.nan, np.nan]))
    assert (s.count, s.missing, s.mean, s.values, s.quantiles) == (0, 2, None, None, None)


def test_categorical_summary_counts_categories_as_text_most_frequent_first() -> None:
    s = summarize_categorical(pd.Series(["b", "a", None, "b", 7]), allowed=["a", "b"])
    assert (s.rows, s.missing, s.count, s.other) == (5, 1, 4, 0)
    assert list(s.categories.items()) == [("b", 2), ("7", 1), ("a", 1)]
    assert s.allowed == ["a", "b"]


def test_categories_beyond_the_cap_are_folded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(prof, "MAX_CATEGORIES", 2)
    s = summarize_categorical(pd.Series(list("aaabbcd")))
    assert s.categories == {"a": 3, "b": 2} and s.other == 2


def test_profile_frame_profiles_every_feature_and_the_predictions() -> None:
    ds = _dataset(("x", "float"), ("n", "int"), ("flag", "bool"), ("c", "category"))
    frame = pd.DataFrame({"ts": pd.date_range("2026-01-01", periods=4, freq="h", tz="UTC"),
                          "x": [0.5, 1.5, None, 2.5], "n": [1, 2, 2, 3], "flag": [True, False, True, True],
                          "c": ["a", "b", "a", None], "other": [9, 9, 9, 9]})
    p = profile_frame(frame, ds, predictions=np.array([0.1, 0.2, 0.3, 0.9]))
    assert p.dataset == "toy" and p.rows == 4 and list(p.features) == ["x", "n", "flag", "c"]
    assert p.numeric_features == ["x", "n", "flag"] and p.categorical_features == ["c"]
    assert p.features["flag"].values == [0.0, 1.0] and p.features["flag"].counts == [1, 3]
    assert p.features["x"].declared_max == 100 and p.features["c"].allowed == ["a", "b", "c"]
    assert p.prediction is not None and p.prediction.count == 4 and p.prediction.declared_max == 1.0
    assert p.start == pd.Timestamp("2026-01-01T00:00Z") and p.end == pd.Timestamp("2026-01-01T03:00Z")


def test_profile_round_trips_through_json() -> None:
    ds = _dataset(("x", "float"), ("c", "category"))
    frame = pd.DataFrame({"x": np.random.default_rng(1).normal(size=3000), "c": ["a", "b", "c"] * 1000})
    p = profile_frame(frame, ds, predictions=np.linspace(0, 1, 3000))
    text = p.to_json()
    assert json.loads(text)["format"] == prof.PROFILE_FORMAT
    assert ReferenceProfile.from_json(text) == p


def test_profile_frame_refuses_missing_columns_bad_types_and_misaligned_predictions() -> None:
    ds = _dataset(("x", "float"), ("c", "category"))
    with pytest.raises(MonitoringError, match=r"lacks feature columns \['c'\]"):
        profile_frame(pd.DataFrame({"x": [1.0]}), ds)
    with pytest.raises(MonitoringError, match="reference column 'x' is not numeric"):
        profile_frame(pd.DataFrame({"x": ["one", "two"], "c": ["a", "b"]}), ds)
    with pytest.raises(MonitoringError, match="3 predictions for 2 reference rows"):
        profile_frame(pd.DataFrame({"x": [1.0, 2.0], "c": ["a", "b"]}), ds, predictions=np.zeros(3))


def test_from_json_names_what_is_wrong() -> None:
    with pytest.raises(MonitoringError, match="is not a reference profile"):
        ReferenceProfile.from_json('{"format": "something else"}', "my.json")
    ds = _dataset(("x", "float"))
    data = json.loads(profile_frame(pd.DataFrame({"x": [1.0, 2.0, 2.0]}), ds).to_json())
    data["features"]["x"]["counts"] = [1, 5]  # tampered: no longer the column's count
    with pytest.raises(MonitoringError, match="counts sum to 6, not count 3"):
        ReferenceProfile.from_json(json.dumps(data))


def test_exact_distribution_cdf_and_quantiles_match_the_sample() -> None:
    x = np.array([1.0, 1.0, 2.0, 5.0])
    d = Distribution(summarize_numeric(x), QUANTILE_LEVELS)
    t = np.array([0.0, 1.0, 1.5, 2.0, 5.0, 6.0])
    assert d.right(t).tolist() == [0.0, 0.5, 0.5, 0.75, 1.0, 1.0]
    assert d.left(t).tolist() == [0.0, 0.0, 0.5, 0.5, 0.75, 1.0]
    u = np.linspace(0, 1, 11)
    assert np.allclose(d.quantile(u), np.quantile(x, u))
    assert d.sample(10).tolist() == [1.0, 1.0, 2.0, 5.0], "an exact reference that fits comes back as it was"


def test_quantile_distribution_is_linear_between_levels() -> None:
    x = np.random.default_rng(2).uniform(0, 10, 20_000)
    d = Distribution(summarize_numeric(x), QUANTILE_LEVELS)
    t = np.array([-1.0, 2.5, 5.0, 7.5, 11.0])
    assert np.allclose(d.right(t), [0, 0.25, 0.5, 0.75, 1], atol=0.01)
    assert np.allclose(d.right(t), d.left(t)), "no steps where no quantile repeats"
    assert np.allclose(d.quantile(np.array([0.5])), np.quantile(x, 0.5), atol=1e-9)


def test_reference_sample_keeps_marginals_and_missing_shares() -> None:
    rng = np.random.default_rng(3)
    ds = _dataset(("x", "float"), ("c", "category"))
    frame = pd.DataFrame({"x": np.where(rng.random(20_000) < 0.1, np.nan, rng.normal(5, 2, 20_000)),
                          "c": rng.choice(["a", "b", None], 20_000, p=[0.6, 0.3, 0.1])})
    p = profile_frame(frame, ds)
    s = reference_sample(p, 5000, seed=1)
    assert len(s) == 5000
    assert s["x"].isna().mean() == pytest.approx(frame["x"].isna().mean(), abs=0.001)
    assert s["x"].mean() == pytest.approx(frame["x"].mean(), abs=0.02) and s["x"].std() == pytest.approx(2, abs=0.05)
    assert s["c"].value_counts(normalize=True, dropna=False)["a"] == pytest.approx(0.6, abs=0.01)


def test_reference_sample_of_a_small_reference_is_the_reference_column_by_column() -> None:
    ds = _dataset(("n", "int"), ("c", "category"))
    frame = pd.DataFrame({"n": [1, 2, 2, 3, None], "c": ["a", "a", "b", None, "c"]})
    s = reference_sample(profile_frame(frame, ds), 5000)
    assert len(s) == 5
    assert sorted(s["n"].dropna()) == [1, 2, 2, 3] and s["n"].isna().sum() == 1
    assert sorted(s["c"].dropna()) == ["a", "a", "b", "c"]
